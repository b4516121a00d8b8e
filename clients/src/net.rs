//! Reaching a host over TCP: name resolution and connect, each within a deadline, trying
//! every address the name has. Shared by the transports, which turn a [`ConnectFailure`]
//! into their own error with their own advice. [`resolve`] and [`connect_addrs`] are the
//! two halves of [`connect`], for `remote test`, which reports them as separate steps.

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
    let addrs = resolve(host, port, timeout).await?;
    connect_addrs(&addrs, timeout)
        .await
        .map(|(stream, _)| stream)
}

/// The addresses of `host` (an address is its own), with `port`.
pub async fn resolve(
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<Vec<SocketAddr>, ConnectFailure> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    match tokio::time::timeout(timeout, tokio::net::lookup_host((host, port))).await {
        Ok(Ok(found)) => {
            let addrs: Vec<SocketAddr> = found.collect();
            if addrs.is_empty() {
                Err(ConnectFailure::Resolve("no addresses".into()))
            } else {
                Ok(addrs)
            }
        }
        Ok(Err(e)) => Err(ConnectFailure::Resolve(e.to_string())),
        Err(_) => Err(ConnectFailure::Resolve(format!(
            "no answer within {} s",
            timeout.as_secs().max(1)
        ))),
    }
}

/// Connect to the first of `addrs` that answers, each within `timeout`, with `TCP_NODELAY`
/// set; returns the stream and the address it reached.
pub async fn connect_addrs(
    addrs: &[SocketAddr],
    timeout: Duration,
) -> Result<(TcpStream, SocketAddr), ConnectFailure> {
    let mut last = ConnectFailure::Resolve("no addresses".into());
    for &sa in addrs {
        tracing::debug!("connecting to {sa}");
        match tokio::time::timeout(timeout, TcpStream::connect(sa)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok((stream, sa));
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
