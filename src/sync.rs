//! Locks (temporary until the sync module lands).
use std::sync::{Mutex, MutexGuard};
/// Locks `m`, ignoring poisoning: our critical sections leave data consistent.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
