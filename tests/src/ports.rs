//! Free TCP ports for test processes, unique across concurrently running
//! test processes (nextest runs each test in its own process).
//!
//! A port is handed out only while this process holds an exclusive advisory
//! lock on `$TMPDIR/redmesh-test-ports/<port>.lock` and the port is
//! bindable. Locks are held until the process exits (the OS releases them
//! even on a crash), so no two live test processes ever get the same port.
//! Ports come from below Linux's ephemeral range, so outgoing connections do
//! not take them between the pick and the bind.

use std::fs::{File, OpenOptions};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Mutex;

const FIRST: u16 = 20_000;
const LAST: u16 = 32_000;

static HELD: Mutex<Vec<File>> = Mutex::new(Vec::new());

fn lock_dir() -> PathBuf {
    let dir = std::env::temp_dir().join("redmesh-test-ports");
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// A port no other live test process holds, currently bindable on 127.0.0.1.
pub fn free_port() -> u16 {
    let dir = lock_dir();
    // Start at a pid-dependent offset so processes rarely contend.
    let span = u32::from(LAST - FIRST);
    let start = (std::process::id().wrapping_mul(2_654_435_761) % span) as u16;
    for i in 0..span as u16 {
        let port = FIRST + (start + i) % (LAST - FIRST);
        let Ok(file) = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(format!("{port}.lock")))
        else {
            continue;
        };
        if file.try_lock().is_err() {
            continue; // another live test process holds it
        }
        let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            held.push(file);
            return port;
        }
    }
    panic!("no free port in {FIRST}-{LAST}");
}
