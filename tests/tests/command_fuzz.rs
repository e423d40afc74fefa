//! Hostile input at the command layer: every command and subcommand of the
//! table, with random arguments drawn from words that steer argument
//! parsing (numbers, keywords, empty strings), sent through a proxy's
//! cluster-mode and plain-mode listeners. Each request must get exactly one
//! well-formed reply (blocking commands may block), the proxy must never
//! drop a connection or panic, and the cluster must serve normally after.
//! The RESP codec itself is fuzzed by `./tests/fuzz.sh`; this reaches what
//! lies behind it: routing, key extraction, splitting, refusals, compression.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use bytes::BytesMut;
use redis::AsyncCommands;
use redmesh_api::v1;
use redmesh_e2e::harness::Rng;
use redmesh_e2e::system::patient_cluster_client;
use redmesh_e2e::System;
use redmesh_resp::command::{self, flags};
use redmesh_resp::{encode_command, parse_frame, Frame};

/// Words arguments are drawn from. No "0" or bare integers above 3, so a
/// blocking command's timeout is short or invalid (never "block forever"),
/// and counts stay small.
const WORDS: &[&str] = &[
    "1",
    "2",
    "3",
    "-1",
    "0.01",
    "abc",
    "",
    "k",
    "{k}x",
    "h",
    "STREAMS",
    "KEYS",
    "STORE",
    "LIMIT",
    "GET",
    "BY",
    "COUNT",
    "BLOCK",
    "EX",
    "PX",
    "NX",
    "XX",
    "WITHSCORES",
    "MATCH",
    "*",
    ">",
    "$",
    "+inf",
    "-inf",
    "99999999999999999999",
    "\u{0}\u{ff}",
];

/// What one request got.
enum Outcome {
    Reply(Frame),
    /// No reply within the wait: only a blocking command may do that.
    Silent,
    /// The proxy closed the connection without a full reply.
    Closed(Vec<u8>),
}

/// Sends `args` on a fresh connection (no state carries over: MULTI,
/// SUBSCRIBE, HELLO 3, AUTH…) and reads one reply.
fn request(addr: &str, args: &[&[u8]], wait: Duration) -> Outcome {
    let mut s = TcpStream::connect(addr).expect("proxy accepts");
    s.set_read_timeout(Some(wait)).unwrap();
    let mut out = BytesMut::new();
    encode_command(args, &mut out);
    s.write_all(&out).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match parse_frame(&buf) {
            Ok(Some((frame, _))) => return Outcome::Reply(frame),
            Ok(None) => {}
            Err(e) => panic!("{args:?}: malformed reply ({e}): {buf:?}"),
        }
        match s.read(&mut chunk) {
            Ok(0) => return Outcome::Closed(buf),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Outcome::Silent
            }
            Err(_) => return Outcome::Closed(buf),
        }
    }
}

/// The panic messages in a proxy log, for failure messages.
fn panics(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    let found: Vec<String> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.contains("panicked"))
        .map(|(i, _)| lines[i..(i + 3).min(lines.len())].join("\n"))
        .collect();
    format!("proxy panics: [{}]", found.join("\n---\n"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_commands_get_one_reply_each_and_leave_the_proxy_serving() {
    // Two clusters: one plain, one compressing values (another request
    // path: values rewritten, some commands refused).
    let sys = System::start(4);
    sys.register_all().await;
    let plain = sys
        .create_cluster("fuzz", 4, v1::ClusterConfig::default())
        .await;
    let compressed = sys
        .create_cluster(
            "fuzz-z",
            4,
            v1::ClusterConfig {
                compression: v1::Compression::Lz4 as i32,
                compression_threshold: 1,
                ..Default::default()
            },
        )
        .await;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let (mut replies, mut errors, mut blocked) = (0u32, 0u32, 0u32);
    let proxies = [sys.members(&plain)[0], sys.members(&compressed)[0]];
    for proxy in proxies {
        for cmd in command::all()
            .iter()
            .flat_map(|c| std::iter::once(c).chain(c.subcommands))
        {
            let blocking = cmd.has(flags::BLOCKING);
            for endpoint in [&proxy.resp, &proxy.plain] {
                for _ in 0..8 {
                    let mut args: Vec<&[u8]> = cmd.name.split('|').map(str::as_bytes).collect();
                    let extra = rng.below(8);
                    args.extend((0..extra).map(|_| WORDS[rng.below(WORDS.len())].as_bytes()));
                    let wait = if blocking {
                        Duration::from_millis(200)
                    } else {
                        Duration::from_secs(5)
                    };
                    match request(endpoint, &args, wait) {
                        Outcome::Reply(f) => {
                            replies += 1;
                            errors += u32::from(matches!(f, Frame::Error(_)));
                        }
                        Outcome::Silent => {
                            assert!(blocking, "{args:?} on {endpoint}: no reply within {wait:?}");
                            blocked += 1;
                        }
                        Outcome::Closed(got) => panic!(
                            "{args:?} on {endpoint}: connection closed after {:?}\n{}",
                            String::from_utf8_lossy(&got),
                            panics(&proxy.log_text())
                        ),
                    }
                }
            }
        }
    }
    eprintln!("{replies} replies ({errors} errors), {blocked} blocked requests");
    assert!(replies > 10_000, "{replies} replies");

    // The proxies are whole: no panic logged, and serving clients.
    for proxy in proxies {
        let log = proxy.log_text();
        assert!(!log.contains("panicked"), "{}", panics(&log));
        let mut conn = patient_cluster_client([&proxy.resp])
            .get_async_connection()
            .await
            .unwrap();
        for i in 0..50 {
            let () = conn.set(format!("after:{i}"), i).await.unwrap();
            let v: u32 = conn.get(format!("after:{i}")).await.unwrap();
            assert_eq!(v, i);
        }
    }
}
