//! Small synchronisation helpers shared by the crate: the one poison-tolerant `lock`.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `m`, recovering the data if another thread panicked while holding the lock. Our
/// std mutexes guard short, self-contained updates (counters, maps, caches) that a panic
/// elsewhere cannot leave half-written, so a poisoned lock must not cascade into more panics.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_mutex_still_locks() {
        let m = std::sync::Arc::new(Mutex::new(1));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = m2.lock().unwrap();
            panic!("poison it");
        })
        .join();
        assert!(m.is_poisoned());
        *lock(&m) += 1;
        assert_eq!(*lock(&m), 2);
    }
}
