//! Network partitions between processes of one machine: processes started
//! inside a cgroup (v2) of their own, and nftables rules that drop what the
//! sockets of one cgroup send to chosen ports. Needs root, a writable
//! cgroup2 hierarchy and `nft` (Debian's nftables); [`Partitions::new`]
//! says why not when any is missing, and tests then skip saying so.
//!
//! A socket belongs to the cgroup its process was in when it created it,
//! so processes are started inside their group ([`Partitions::spawn_in`]),
//! never moved there.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// Where [`crate::Child::spawn`] starts processes now, if in a cgroup.
static SPAWN_INTO: Mutex<Option<PathBuf>> = Mutex::new(None);

/// `cmd`, wrapped to enter the cgroup set by [`Partitions::spawn_in`]
/// before it runs, if one is set.
pub(crate) fn wrap(cmd: Command) -> Command {
    let into = SPAWN_INTO.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let Some(dir) = into else {
        return cmd;
    };
    // The shell writes its own pid (which exec keeps) into the group.
    let mut wrapped = Command::new("sh");
    wrapped
        .arg("-c")
        .arg("echo $$ > \"$0/cgroup.procs\" && exec \"$@\"")
        .arg(dir)
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => wrapped.env(k, v),
            None => wrapped.env_remove(k),
        };
    }
    if let Some(d) = cmd.get_current_dir() {
        wrapped.current_dir(d);
    }
    wrapped
}

/// The cgroups and nftables table of one test process; removed on drop.
pub struct Partitions {
    /// The cgroup2 mount.
    mount: PathBuf,
    /// The same, as nft names it (relative to `/sys/fs/cgroup`).
    nft_prefix: String,
    /// This test's groups.
    groups: Vec<PathBuf>,
    /// The nftables table.
    table: String,
}

impl std::fmt::Debug for Partitions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Partitions")
            .field("table", &self.table)
            .finish()
    }
}

fn nft(script: &str) -> Result<(), String> {
    let out = Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(script.as_bytes())?;
            child.wait_with_output()
        })
        .map_err(|e| format!("nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nft refused {script:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The pid a leftover's name ends in (`redmesh_test_<pid>`) or carries
/// (`redmesh-<pid>-<group>`), if that process is gone.
fn dead_owner(name: &str) -> Option<u32> {
    let pid: u32 = name
        .strip_prefix("redmesh_test_")
        .or_else(|| name.strip_prefix("redmesh-")?.split('-').next())?
        .parse()
        .ok()?;
    (!Path::new(&format!("/proc/{pid}")).exists()).then_some(pid)
}

/// Removes what test processes that were killed (not failed: a failure
/// drops its [`Partitions`]) left behind: their nft tables and their empty
/// cgroups. Best effort.
fn sweep_leftovers(mount: &Path) {
    if let Ok(out) = Command::new("nft").args(["list", "tables"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(table) = line.strip_prefix("table inet ") {
                if dead_owner(table).is_some() {
                    let _ = nft(&format!("delete table inet {table}\n"));
                }
            }
        }
    }
    if let Ok(dirs) = std::fs::read_dir(mount) {
        for d in dirs.flatten() {
            if dead_owner(&d.file_name().to_string_lossy()).is_some() {
                // Fails, harmlessly, while a process still runs inside.
                let _ = std::fs::remove_dir(d.path());
            }
        }
    }
}

impl Partitions {
    /// Ready to partition, or why this machine cannot. Removes first what
    /// killed test runs left behind.
    pub fn new() -> Result<Self, String> {
        let mounts = std::fs::read_to_string("/proc/mounts").map_err(|e| e.to_string())?;
        let mount = mounts
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.get(2) == Some(&"cgroup2"))
            .and_then(|f| f.get(1).map(PathBuf::from))
            .ok_or("no cgroup2 hierarchy is mounted")?;
        let nft_prefix = mount
            .strip_prefix("/sys/fs/cgroup")
            .map_err(|_| {
                format!(
                    "cgroup2 is mounted at {}, not under /sys/fs/cgroup, where nft looks",
                    mount.display()
                )
            })?
            .to_string_lossy()
            .into_owned();
        sweep_leftovers(&mount);
        let table = format!("redmesh_test_{}", std::process::id());
        nft(&format!("add table inet {table}\n"))?;
        let p = Self {
            mount,
            nft_prefix,
            groups: Vec::new(),
            table,
        };
        nft(&format!(
            "add chain inet {t} out {{ type filter hook output priority 0 ; }}\n\
             add chain inet {t} in {{ type filter hook input priority 0 ; }}\n",
            t = p.table
        ))?;
        Ok(p)
    }

    /// Partitions for a test, or `None` (saying why) where this machine
    /// cannot partition processes; a panic then if
    /// `REDMESH_REQUIRE_PARTITIONS=1` (`./tests/run.sh` sets it where the
    /// machine can).
    pub fn for_test() -> Option<Self> {
        match Self::new() {
            Ok(p) => Some(p),
            Err(why) if std::env::var("REDMESH_REQUIRE_PARTITIONS").as_deref() == Ok("1") => {
                panic!("REDMESH_REQUIRE_PARTITIONS=1, but: {why}")
            }
            Err(why) => {
                eprintln!("this machine cannot partition processes, so no partitions: {why}");
                None
            }
        }
    }

    /// A new cgroup `name` (unique to this test process).
    pub fn group(&mut self, name: &str) -> Result<String, String> {
        let full = format!("redmesh-{}-{name}", std::process::id());
        let dir = self.mount.join(&full);
        std::fs::create_dir(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        self.groups.push(dir);
        Ok(full)
    }

    /// Runs `start`, every process it spawns through [`crate::Child`]
    /// starting inside cgroup `group`.
    pub fn spawn_in<T>(&self, group: &str, start: impl FnOnce() -> T) -> T {
        *SPAWN_INTO.lock().unwrap_or_else(|e| e.into_inner()) = Some(self.mount.join(group));
        struct Reset;
        impl Drop for Reset {
            fn drop(&mut self) {
                *SPAWN_INTO.lock().unwrap_or_else(|e| e.into_inner()) = None;
            }
        }
        let _reset = Reset;
        start()
    }

    /// Drops every packet between the sockets of `group` and `ports` on
    /// this machine, both ways (what they send to those ports, what comes
    /// back from them), until [`Partitions::heal`].
    pub fn cut(&self, group: &str, ports: &[u16]) -> Result<(), String> {
        let path = Path::new(&self.nft_prefix).join(group);
        let path = path.to_string_lossy();
        let path = path.trim_start_matches('/');
        let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
        let ports = ports.join(", ");
        nft(&format!(
            "add rule inet {t} out socket cgroupv2 level 1 \"{path}\" tcp dport {{ {ports} }} drop\n\
             add rule inet {t} in socket cgroupv2 level 1 \"{path}\" tcp sport {{ {ports} }} drop\n",
            t = self.table
        ))
    }

    /// Removes every cut.
    pub fn heal(&self) -> Result<(), String> {
        nft(&format!(
            "flush chain inet {t} out\nflush chain inet {t} in\n",
            t = self.table
        ))
    }
}

impl Drop for Partitions {
    fn drop(&mut self) {
        let _ = nft(&format!("delete table inet {}\n", self.table));
        // Processes in the groups are killed by their owners' drops; a
        // group still holding one stays behind, harmless.
        for g in &self.groups {
            let _ = std::fs::remove_dir(g);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pid of a process that has ended.
    fn dead_pid() -> u32 {
        let mut child = Command::new("true").spawn().expect("true runs");
        let pid = child.id();
        child.wait().expect("true ends");
        pid
    }

    #[test]
    fn only_leftovers_of_ended_processes_are_swept() {
        let me = std::process::id();
        let dead = dead_pid();
        assert_eq!(dead_owner(&format!("redmesh_test_{me}")), None);
        assert_eq!(dead_owner(&format!("redmesh-{me}-proxy-1")), None);
        assert_eq!(dead_owner(&format!("redmesh_test_{dead}")), Some(dead));
        assert_eq!(dead_owner(&format!("redmesh-{dead}-control")), Some(dead));
        assert_eq!(dead_owner(&format!("redmesh_probe_{dead}")), None);
        assert_eq!(dead_owner("system.slice"), None);
    }

    #[test]
    fn a_killed_runs_table_and_groups_are_removed_by_the_next() {
        // A first instance stands for the killed run (its drop is skipped,
        // as a kill skips it); its names then carry a dead pid.
        let Some(first) = Partitions::for_test() else {
            return;
        };
        let dead = dead_pid();
        let table = format!("redmesh_test_{dead}");
        nft(&format!("add table inet {table}\n")).unwrap();
        let group = first.mount.join(format!("redmesh-{dead}-proxy-0"));
        std::fs::create_dir(&group).unwrap();
        drop(first);
        let _next = Partitions::new().unwrap();
        let tables = Command::new("nft")
            .args(["list", "tables"])
            .output()
            .unwrap();
        let tables = String::from_utf8_lossy(&tables.stdout).into_owned();
        assert!(!tables.contains(&table), "{tables}");
        assert!(!group.exists(), "{} stayed", group.display());
    }
}
