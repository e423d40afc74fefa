//! Free TCP ports for test processes.
//!
//! The OS picks an unused port; a process-wide set stops two harness objects
//! in one test binary from ever receiving the same port, and ports are
//! drawn from below the ephemeral range so outgoing connections of other
//! processes do not take them between pick and bind.

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::{Mutex, OnceLock};

/// A port nobody in this process has been given, currently bindable on 127.0.0.1.
pub fn free_port() -> u16 {
    static TAKEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let taken = TAKEN.get_or_init(Default::default);
    // Spread test binaries running in parallel over the range by pid.
    let mut candidate = 20_000 + (std::process::id() % 500) as u16 * 50;
    loop {
        candidate = if candidate >= 31_000 {
            20_000
        } else {
            candidate + 1
        };
        let mut set = taken.lock().unwrap_or_else(|e| e.into_inner());
        if set.contains(&candidate) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", candidate)).is_ok() {
            set.insert(candidate);
            return candidate;
        }
    }
}
