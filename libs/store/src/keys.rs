//! The etcd key layout (DESIGN.md §2), in one place so no service spells a key by hand.

/// Key builder under a root prefix such as `/redmesh/v1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    root: String,
}

impl Keys {
    /// Keys under `root` (a trailing `/` is ignored).
    pub fn new(root: &str) -> Self {
        Self {
            root: root.trim_end_matches('/').to_owned(),
        }
    }

    /// The root prefix itself, with a trailing `/`: watch this to see everything.
    pub fn root(&self) -> String {
        format!("{}/", self.root)
    }

    /// The global epoch counter.
    pub fn epoch(&self) -> String {
        format!("{}/epoch", self.root)
    }

    /// Prefix of every proxy record.
    pub fn proxies(&self) -> String {
        format!("{}/proxies/", self.root)
    }

    /// One proxy record.
    pub fn proxy(&self, id: &str) -> String {
        format!("{}/proxies/{id}", self.root)
    }

    /// Prefix of every cluster record.
    pub fn clusters(&self) -> String {
        format!("{}/clusters/", self.root)
    }

    /// One cluster record.
    pub fn cluster(&self, name: &str) -> String {
        format!("{}/clusters/{name}", self.root)
    }

    /// Prefix of every health verdict.
    pub fn health(&self) -> String {
        format!("{}/health/", self.root)
    }

    /// One checker's verdict on one proxy.
    pub fn health_verdict(&self, checker: &str, proxy: &str) -> String {
        format!("{}/health/{checker}/{proxy}", self.root)
    }

    /// Prefix of every live checker's presence record.
    pub fn checkers(&self) -> String {
        format!("{}/checkers/", self.root)
    }

    /// One checker's presence record (leased).
    pub fn checker(&self, checker: &str) -> String {
        format!("{}/checkers/{checker}", self.root)
    }

    /// Prefix of the coordinator's recorded decisions.
    pub fn events(&self) -> String {
        format!("{}/events/", self.root)
    }

    /// One recorded decision; ids sort by time.
    pub fn event(&self, id: &str) -> String {
        format!("{}/events/{id}", self.root)
    }

    /// Prefix of every migration task.
    pub fn all_migrations(&self) -> String {
        format!("{}/migrations/", self.root)
    }

    /// Prefix of a cluster's migration tasks.
    pub fn migrations(&self, cluster: &str) -> String {
        format!("{}/migrations/{cluster}/", self.root)
    }

    /// One migration task.
    pub fn migration(&self, cluster: &str, task: &str) -> String {
        format!("{}/migrations/{cluster}/{task}", self.root)
    }

    /// Prefix of an election's candidates.
    pub fn election(&self, name: &str) -> String {
        format!("{}/election/{name}/", self.root)
    }

    /// What follows a prefix in a key (`proxies/p1` → `p1`).
    pub fn suffix<'a>(key: &'a str, prefix: &str) -> Option<&'a str> {
        key.strip_prefix(prefix)
            .filter(|s| !s.is_empty() && !s.contains('/'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let k = Keys::new("/redmesh/v1/");
        assert_eq!(k.proxy("p1"), "/redmesh/v1/proxies/p1");
        assert_eq!(k.cluster("demo"), "/redmesh/v1/clusters/demo");
        assert_eq!(
            k.election("coordinator"),
            "/redmesh/v1/election/coordinator/"
        );
        assert_eq!(Keys::suffix(&k.proxy("p1"), &k.proxies()), Some("p1"));
        assert_eq!(Keys::suffix("/redmesh/v1/proxies/a/b", &k.proxies()), None);
    }
}
