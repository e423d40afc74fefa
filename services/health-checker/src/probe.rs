//! One probe target and how to ask it whether it is alive: RESP `PING` over a
//! kept connection, or `grpc.health.v1.Health/Check` over a lazy channel.
//!
//! Any well-formed RESP reply counts as alive, errors included (`-NOAUTH`,
//! `-LOADING`): the question is whether the process answers, not whether it
//! likes us. A gRPC health answer of NOT_SERVING is an answer too, but one
//! saying the proxy cannot serve (see [`Answer::serving`]). A timed-out or
//! failed probe drops the connection, so the next probe starts clean
//! instead of reading a stale reply.

use std::time::{Duration, Instant};

use redmesh_runtime::trace_context::{traced, TracedChannel};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient};

/// A target's answer to one probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    /// Round-trip time.
    pub rtt: Duration,
    /// `false` when the target answered that it cannot serve (gRPC health
    /// NOT_SERVING).
    pub serving: bool,
}

/// How a target is probed.
pub enum Probe {
    /// RESP PING (proxy listener or Redis node).
    Resp {
        /// host:port.
        addr: String,
        /// Kept connection.
        conn: Option<BufReader<TcpStream>>,
    },
    /// gRPC health check of the proxy's admin server.
    Grpc {
        /// host:port.
        addr: String,
        /// Lazily connected channel (reconnects by itself).
        client: Option<HealthClient<TracedChannel>>,
    },
}

impl std::fmt::Debug for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Resp { addr, .. } => write!(f, "Resp({addr})"),
            Self::Grpc { addr, .. } => write!(f, "Grpc({addr})"),
        }
    }
}

impl Probe {
    /// A RESP target.
    pub fn resp(addr: &str) -> Self {
        Self::Resp {
            addr: addr.to_owned(),
            conn: None,
        }
    }

    /// A gRPC health target.
    pub fn grpc(addr: &str) -> Self {
        Self::Grpc {
            addr: addr.to_owned(),
            client: None,
        }
    }

    /// Probes once within `timeout`.
    pub async fn check(&mut self, timeout: Duration) -> Result<Answer, String> {
        let start = Instant::now();
        let outcome = match tokio::time::timeout(timeout, self.check_inner(timeout)).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
        };
        if outcome.is_err() {
            self.reset();
        }
        outcome.map(|serving| Answer {
            rtt: start.elapsed(),
            serving,
        })
    }

    fn reset(&mut self) {
        match self {
            Self::Resp { conn, .. } => *conn = None,
            Self::Grpc { client, .. } => *client = None,
        }
    }

    /// `Ok(serving)` for an answer.
    async fn check_inner(&mut self, timeout: Duration) -> Result<bool, String> {
        match self {
            Self::Resp { addr, conn } => {
                if conn.is_none() {
                    let stream = TcpStream::connect(addr.as_str())
                        .await
                        .map_err(|e| format!("connect: {e}"))?;
                    let _ = stream.set_nodelay(true);
                    *conn = Some(BufReader::new(stream));
                }
                let Some(c) = conn.as_mut() else {
                    return Err("no connection".into());
                };
                c.get_mut()
                    .write_all(b"*1\r\n$4\r\nPING\r\n")
                    .await
                    .map_err(|e| format!("write: {e}"))?;
                let mut line = String::new();
                // A reply line is short; the cap keeps a misbehaving peer
                // from growing the buffer.
                let n = (&mut *c)
                    .take(4096)
                    .read_line(&mut line)
                    .await
                    .map_err(|e| format!("read: {e}"))?;
                match line.as_bytes().first() {
                    _ if n == 0 => Err("connection closed".into()),
                    Some(b'+' | b'-') if line.ends_with("\r\n") => Ok(true),
                    _ => Err(format!(
                        "unexpected reply {:?}",
                        line.chars().take(64).collect::<String>()
                    )),
                }
            }
            Self::Grpc { addr, client } => {
                if client.is_none() {
                    let endpoint = redmesh_runtime::tls::endpoint(addr)
                        .map_err(|e| e.to_string())?
                        .connect_timeout(timeout)
                        .tcp_nodelay(true);
                    *client = Some(HealthClient::new(traced(endpoint.connect_lazy())));
                }
                let Some(c) = client.as_mut() else {
                    return Err("no channel".into());
                };
                let reply = c
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .map_err(|s| format!("health check: {}", s.message()))?;
                match reply.into_inner().status() {
                    ServingStatus::Serving => Ok(true),
                    ServingStatus::NotServing => Ok(false),
                    other => Err(format!("health status {}", other.as_str_name())),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn resp_probe_accepts_any_reply_line_and_fails_on_silence() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            // First connection answers an error (alive), then goes silent.
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 64];
            let _ = s.read(&mut buf).await.unwrap();
            s.write_all(b"-NOAUTH Authentication required.\r\n")
                .await
                .unwrap();
            let _ = s.read(&mut buf).await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let mut p = Probe::resp(&addr);
        assert!(p.check(Duration::from_secs(1)).await.is_ok());
        let e = p.check(Duration::from_millis(100)).await.unwrap_err();
        assert!(e.contains("no answer"), "{e}");
    }

    #[tokio::test]
    async fn resp_probe_reports_refused_connections() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        drop(listener);
        let e = Probe::resp(&addr)
            .check(Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(e.contains("connect"), "{e}");
    }
}
