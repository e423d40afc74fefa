//! Command metrics of one session, gathered per write to the client so a
//! pipeline of N replies costs a handful of metric updates, not N.
//!
//! Series: `redmesh_proxy_commands_total{command, result}` (result: `ok`,
//! `error`, or the cluster redirections and refusals clients act on:
//! `moved`, `ask`, `tryagain`, `clusterdown`, `crossslot`),
//! `redmesh_proxy_command_duration_seconds` (from the read that brought the
//! request to the write that carried its reply: what the client waits for,
//! less the network), `redmesh_proxy_client_bytes_{received,sent}_total`
//! and `redmesh_proxy_requests_in_flight`.

use std::time::Instant;

/// Commands answered, by command and result.
pub const COMMANDS: &str = "redmesh_proxy_commands_total";
/// Time from reading a request to writing its reply.
pub const DURATION: &str = "redmesh_proxy_command_duration_seconds";
/// Bytes read from clients.
pub const BYTES_IN: &str = "redmesh_proxy_client_bytes_received_total";
/// Bytes written to clients.
pub const BYTES_OUT: &str = "redmesh_proxy_client_bytes_sent_total";
/// Requests whose replies are not yet written, over all sessions.
pub const IN_FLIGHT: &str = "redmesh_proxy_requests_in_flight";

/// What a reply says, for the `result` label.
pub fn result_of(reply: &[u8]) -> &'static str {
    match reply.first() {
        Some(b'-') | Some(b'!') => {}
        _ => return "ok",
    }
    // A RESP3 blob error ("!<len>\r\n<text>") keeps its text after the
    // length line.
    let text = if reply[0] == b'!' {
        reply
            .iter()
            .position(|&b| b == b'\n')
            .map_or(&reply[1..], |i| &reply[i + 1..])
    } else {
        &reply[1..]
    };
    for (prefix, label) in [
        (&b"MOVED "[..], "moved"),
        (b"ASK ", "ask"),
        (b"TRYAGAIN", "tryagain"),
        (b"CLUSTERDOWN", "clusterdown"),
        (b"CROSSSLOT", "crossslot"),
    ] {
        if text.starts_with(prefix) {
            return label;
        }
    }
    "error"
}

/// The span of one sampled command (its result is recorded when the reply
/// is written).
pub fn command_span(command: &'static str, client: u64) -> tracing::Span {
    tracing::info_span!(
        "redis.command",
        otel.name = %format!("redis {command}"),
        otel.kind = "server",
        db.system = "redis",
        db.operation = command,
        redmesh.client = client,
        redmesh.result = tracing::field::Empty,
    )
}

/// Counts gathered since the last flush.
#[derive(Debug, Default)]
pub struct Tally {
    commands: Vec<(&'static str, &'static str, u64)>,
    /// (when the request was read, replies written for requests read then)
    waits: Vec<(Instant, u64)>,
}

impl Tally {
    /// One reply about to be written; returns its `result` label.
    pub fn reply(&mut self, command: &'static str, reply: &[u8], read_at: Instant) -> &'static str {
        let result = result_of(reply);
        match self
            .commands
            .iter_mut()
            .find(|(c, r, _)| *c == command && *r == result)
        {
            Some(e) => e.2 += 1,
            None => self.commands.push((command, result, 1)),
        }
        match self.waits.last_mut() {
            Some((at, n)) if *at == read_at => *n += 1,
            _ => self.waits.push((read_at, 1)),
        }
        result
    }

    /// Publishes and resets, once the replies are written.
    pub fn flush(&mut self, written_at: Instant) {
        for (command, result, n) in self.commands.drain(..) {
            metrics::counter!(COMMANDS, "command" => command, "result" => result).increment(n);
        }
        if self.waits.is_empty() {
            return;
        }
        let h = metrics::histogram!(DURATION);
        for (read_at, n) in self.waits.drain(..) {
            let secs = written_at.saturating_duration_since(read_at).as_secs_f64();
            h.record_many(secs, n as usize);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_classified_like_clients_act_on_them() {
        let cases: [(&[u8], &str); 12] = [
            (b"+OK\r\n", "ok"),
            (b"$-1\r\n", "ok"),
            (b"-MOVED 3999 127.0.0.1:7002\r\n", "moved"),
            (b"-ASK 3999 127.0.0.1:7002\r\n", "ask"),
            (b"-TRYAGAIN busy\r\n", "tryagain"),
            (b"-CLUSTERDOWN fenced\r\n", "clusterdown"),
            (b"-CROSSSLOT Keys\r\n", "crossslot"),
            (b"-ERR wrong\r\n", "error"),
            (b"-ASKING\r\n", "error"),
            (b"!21\r\nMOVED 1 127.0.0.1:1\r\n", "moved"),
            (b"-", "error"),
            (b"", "ok"),
        ];
        for (reply, want) in cases {
            assert_eq!(result_of(reply), want, "{}", String::from_utf8_lossy(reply));
        }
    }

    #[test]
    fn a_pipeline_is_one_entry_per_command_and_result() {
        let mut t = Tally::default();
        let at = Instant::now();
        for _ in 0..16 {
            t.reply("get", b"$1\r\nx\r\n", at);
        }
        t.reply("get", b"-MOVED 1 a:1\r\n", at);
        assert_eq!(t.commands, vec![("get", "ok", 16), ("get", "moved", 1)]);
        assert_eq!(t.waits, vec![(at, 17)]);
        t.flush(Instant::now());
        assert!(t.commands.is_empty() && t.waits.is_empty());
    }
}
