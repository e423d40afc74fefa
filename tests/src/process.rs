//! Child processes that are killed and reaped when dropped.

use std::path::Path;
use std::process::{Command, Stdio};

/// A running child process; SIGKILLed and reaped on drop.
pub struct Child {
    name: String,
    inner: Option<std::process::Child>,
    log: std::path::PathBuf,
}

impl std::fmt::Debug for Child {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Child")
            .field("name", &self.name)
            .field("pid", &self.pid())
            .finish()
    }
}

impl Child {
    /// Spawns `cmd`, sending stdout and stderr to `log`.
    /// (Inside the cgroup of [`crate::netpart::Partitions::spawn_in`], if
    /// one is set.)
    pub fn spawn(name: &str, cmd: Command, log: &Path) -> Self {
        let mut cmd = crate::netpart::wrap(cmd);
        let out =
            std::fs::File::create(log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let err = out.try_clone().expect("clone log handle");
        let inner = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Self {
            name: name.to_owned(),
            inner: Some(inner),
            log: log.to_owned(),
        }
    }

    /// Process id, if still running under our control.
    pub fn pid(&self) -> Option<u32> {
        self.inner.as_ref().map(|c| c.id())
    }

    /// Whether the process has exited.
    pub fn exited(&mut self) -> bool {
        match self.inner.as_mut() {
            Some(c) => !matches!(c.try_wait(), Ok(None)),
            None => true,
        }
    }

    /// The whole process log.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines of the log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Sends a signal (e.g. `libc`-free: "-STOP", "-CONT", "-TERM").
    pub fn signal(&self, sig: &str) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill").arg(sig).arg(pid.to_string()).status();
        }
    }

    /// SIGKILL and reap now.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.inner.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait up to `timeout` for a clean exit; SIGKILL after.
    /// Returns whether it exited by itself with status 0.
    pub fn terminate(&mut self, timeout: std::time::Duration) -> bool {
        let Some(mut c) = self.inner.take() else {
            return false;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = c.try_wait() {
                return status.success();
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        false
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.kill();
    }
}
