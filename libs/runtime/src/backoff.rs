//! Jittered exponential backoff for reconnect loops (watch streams, etcd).

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// An endless sequence of jittered delays growing from `min` to `max`.
/// Create a fresh one after a success to start again from `min`.
pub fn reconnect_delays(min: Duration, max: Duration) -> impl Iterator<Item = Duration> + Send {
    let inner = ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
        .build();
    // backon ends the sequence only with max_times; guard anyway.
    inner.chain(std::iter::repeat(max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_caps() {
        let d: Vec<Duration> =
            reconnect_delays(Duration::from_millis(10), Duration::from_millis(200))
                .take(20)
                .collect();
        assert!(
            d[0] >= Duration::from_millis(10) && d[0] <= Duration::from_millis(20),
            "{d:?}"
        );
        // Jitter adds at most one more delay on top of the cap.
        assert!(d.iter().all(|x| *x <= Duration::from_millis(400)), "{d:?}");
        assert!(d[19] >= Duration::from_millis(200), "{d:?}");
    }
}
