//! Time for the whole crate: the one `unix_now()` and the [`Clock`] that expiry logic takes.
//!
//! Monotonic time is `tokio::time::Instant`, so `tokio::time::pause`/`advance` move it in
//! tests. Wall-clock time (seconds since the epoch, written to the token store and the spool)
//! comes from the [`Clock`] too: the system clock in production, or one that advances only
//! with tokio's clock, so a test under paused time sees both move together. Timers and
//! deadlines stay with their owners; this module only tells the time.

use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

/// Seconds since the Unix epoch by the system clock (0 for a clock set before 1970).
pub fn unix_now() -> u64 {
    since_epoch(SystemTime::now()).as_secs()
}

fn since_epoch(t: SystemTime) -> Duration {
    t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO)
}

/// Where time comes from: `now()` is tokio's monotonic clock; `unix_now()` is the system
/// clock or, for tests, a wall clock that follows tokio's (possibly paused) clock.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Clock {
    wall: Wall,
}

#[derive(Debug, Clone, Copy, Default)]
enum Wall {
    #[default]
    System,
    /// Wall time = `at_start` + tokio time elapsed since `start` (tests under paused time).
    #[cfg(test)]
    FollowsTokio { at_start: Duration, start: Instant },
}

impl Clock {
    /// Tokio's monotonic clock and the system's wall clock.
    pub(crate) fn system() -> Clock {
        Clock { wall: Wall::System }
    }

    /// A clock whose wall time starts at the system's and then advances only with tokio's
    /// clock: under `tokio::time::pause`, `advance` moves `now()` and `unix_now()` alike.
    #[cfg(test)]
    pub(crate) fn following_tokio() -> Clock {
        Clock {
            wall: Wall::FollowsTokio {
                at_start: since_epoch(SystemTime::now()),
                start: Instant::now(),
            },
        }
    }

    /// Monotonic now (tokio's clock; paused time applies).
    pub(crate) fn now(&self) -> Instant {
        Instant::now()
    }

    /// Seconds since the Unix epoch by this clock.
    pub(crate) fn unix_now(&self) -> u64 {
        match self.wall {
            Wall::System => unix_now(),
            #[cfg(test)]
            Wall::FollowsTokio { at_start, start } => (at_start + start.elapsed()).as_secs(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_wall_clock_is_after_2020() {
        assert!(unix_now() > 1_577_836_800);
        assert!(Clock::system().unix_now() > 1_577_836_800);
    }

    #[tokio::test(start_paused = true)]
    async fn a_clock_following_tokio_moves_only_with_paused_time() {
        let clock = Clock::following_tokio();
        let (wall, mono) = (clock.unix_now(), clock.now());
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(clock.now() - mono, Duration::from_secs(3600));
        assert_eq!(clock.unix_now() - wall, 3600);
    }
}
