//! Chunk allocation: choosing pairs of free proxies on different hosts.
//!
//! Greedy over host buckets: each chunk takes one proxy from each of the two
//! hosts with the most free proxies left. That reaches the maximum number of
//! pairs, min(n / 2, n - largest bucket), and spreads chunks over hosts.

use std::collections::BTreeMap;

use crate::{Chunk, HostName, ModelError, Proxy, ProxyState};

/// Picks `count` chunks from the free proxies among `pool`. Deterministic:
/// ties go to the lexicographically smaller host and proxy id.
pub fn pick_chunks<'a>(
    pool: impl IntoIterator<Item = &'a Proxy>,
    count: usize,
) -> Result<Vec<Chunk>, ModelError> {
    let mut by_host: BTreeMap<&HostName, Vec<&Proxy>> = BTreeMap::new();
    for p in pool.into_iter().filter(|p| p.state == ProxyState::Free) {
        by_host.entry(&p.spec.host).or_default().push(p);
    }
    for bucket in by_host.values_mut() {
        // Pop from the end: keep smallest ids last.
        bucket.sort_by(|a, b| b.id().cmp(a.id()));
    }
    let summary = describe(&by_host);
    let mut chunks = Vec::with_capacity(count);
    while chunks.len() < count {
        let mut hosts: Vec<(&HostName, usize)> = by_host
            .iter()
            .map(|(h, b)| (*h, b.len()))
            .filter(|(_, n)| *n > 0)
            .collect();
        // Most free proxies first; BTreeMap order breaks ties by host name.
        hosts.sort_by_key(|h| std::cmp::Reverse(h.1));
        let (first, second) = match hosts.as_slice() {
            [first, second, ..] => (first.0, second.0),
            _ => {
                return Err(ModelError::FailedPrecondition(format!(
                    "not enough free proxies: {count} chunk(s) need {} free proxies in pairs on different hosts; \
                     the pool has {summary}{}",
                    count * 2,
                    if summary == "no free proxies" {
                        String::new()
                    } else {
                        format!(", enough for {} chunk(s)", chunks.len())
                    }
                )))
            }
        };
        let a = by_host.get_mut(first).and_then(Vec::pop);
        let b = by_host.get_mut(second).and_then(Vec::pop);
        if let (Some(a), Some(b)) = (a, b) {
            chunks.push(Chunk {
                proxies: [a.id().clone(), b.id().clone()],
            });
        }
    }
    Ok(chunks)
}

fn describe(by_host: &BTreeMap<&HostName, Vec<&Proxy>>) -> String {
    let total: usize = by_host.values().map(Vec::len).sum();
    if total == 0 {
        return "no free proxies".to_owned();
    }
    let per_host: Vec<String> = by_host
        .iter()
        .map(|(h, b)| format!("{} on {h}", b.len()))
        .collect();
    format!("{total} free ({})", per_host.join(", "))
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::{Address, ProxyId, ProxySpec};

    fn proxy(id: &str, host: &str, n: u16) -> Proxy {
        let addr = |p: u16| Address::parse_field("a", &format!("10.0.0.1:{p}")).unwrap();
        Proxy {
            spec: ProxySpec::new(
                ProxyId::parse(id).unwrap(),
                addr(n),
                addr(n + 100),
                HostName::parse(host).unwrap(),
                [addr(n + 200), addr(n + 300)],
            )
            .unwrap(),
            state: ProxyState::Free,
            cluster: None,
            epoch: 1,
            registered_at: SystemTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn pairs_cross_hosts() {
        let pool = [
            proxy("p1", "a", 1),
            proxy("p2", "a", 2),
            proxy("p3", "b", 3),
            proxy("p4", "b", 4),
        ];
        let chunks = pick_chunks(&pool, 2).unwrap();
        assert_eq!(chunks.len(), 2);
        for c in &chunks {
            let host = |id: &ProxyId| {
                pool.iter()
                    .find(|p| p.id() == id)
                    .unwrap()
                    .spec
                    .host
                    .clone()
            };
            assert_ne!(host(&c.proxies[0]), host(&c.proxies[1]));
        }
        assert_eq!(chunks[0].proxies[0].as_str(), "p1");
        assert_eq!(chunks[0].proxies[1].as_str(), "p3");
    }

    #[test]
    fn maximum_matching_with_skewed_hosts() {
        // 3 on a, 1 on b, 2 on c: 3 pairs are possible (n/2 = 3, n - 3 = 3).
        let pool = [
            proxy("a1", "a", 1),
            proxy("a2", "a", 2),
            proxy("a3", "a", 3),
            proxy("b1", "b", 4),
            proxy("c1", "c", 5),
            proxy("c2", "c", 6),
        ];
        assert_eq!(pick_chunks(&pool, 3).unwrap().len(), 3);
    }

    #[test]
    fn refuses_same_host_and_explains() {
        let pool = [
            proxy("p1", "a", 1),
            proxy("p2", "a", 2),
            proxy("p3", "a", 3),
        ];
        let err = pick_chunks(&pool, 1).unwrap_err().to_string();
        assert!(
            err.contains("3 free (3 on a), enough for 0 chunk(s)"),
            "{err}"
        );
        let mut taken = proxy("p4", "b", 4);
        taken.state = ProxyState::Allocated;
        let pool = [proxy("p1", "a", 1), taken];
        assert!(pick_chunks(&pool, 1).is_err());
    }
}
