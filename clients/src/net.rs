//! Reaching a host over TCP: name resolution and connect, each within a deadline, trying
//! every address the name has. Shared by the transports, which turn a [`ConnectFailure`]
//! into their own error with their own advice.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::net::TcpStream;

/// Why no connection was made (the last address tried decides).
#[derive(Debug)]
pub enum ConnectFailure {
    /// The name did not resolve (the reason, for the message).
    Resolve(String),
    Refused,
    Timeout,
    Io(std::io::Error),
}

/// Connect to `host:port` (an address or a name), with `TCP_NODELAY` set.
pub async fn connect(
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<TcpStream, ConnectFailure> {
    let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => {
            match tokio::time::timeout(timeout, tokio::net::lookup_host((host, port))).await {
                Ok(Ok(found)) => found.collect(),
                Ok(Err(e)) => return Err(ConnectFailure::Resolve(e.to_string())),
                Err(_) => {
                    return Err(ConnectFailure::Resolve(format!(
                        "no answer within {} s",
                        timeout.as_secs().max(1)
                    )));
                }
            }
        }
    };
    let mut last = ConnectFailure::Resolve("no addresses".into());
    for sa in addrs {
        tracing::debug!("connecting to {sa}");
        match tokio::time::timeout(timeout, TcpStream::connect(sa)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                last = ConnectFailure::Refused
            }
            Ok(Err(e)) => last = ConnectFailure::Io(e),
            Err(_) => last = ConnectFailure::Timeout,
        }
    }
    Err(last)
}
