//! A TCP proxy that puts distance between a client and a server on loopback: every byte is
//! delivered a fixed one-way delay after it was read, in each direction, in order (this
//! kernel has no netem). The benchmark puts it in front of the fake upstream so that the
//! direct path and the bridge both pay the same round-trip time to "Microsoft 365".
//!
//! Memory per connection is bounded: at most [`IN_FLIGHT`] chunks of [`CHUNK`] bytes wait
//! in each direction; a faster sender is held back by TCP, as on a real long link.

use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Bytes read at once.
const CHUNK: usize = 16 * 1024;
/// Chunks on their way in one direction of one connection.
const IN_FLIGHT: usize = 256;

/// A running delay proxy; it serves until the runtime shuts down.
#[derive(Debug, Clone)]
pub struct DelayProxy {
    addr: SocketAddr,
}

impl DelayProxy {
    /// Accepts on `listener` and forwards each connection to `target`, delaying each
    /// direction by `one_way` (a round trip costs twice that).
    pub async fn start(listener: TcpListener, target: SocketAddr, one_way: Duration) -> DelayProxy {
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(pump(cr, sw, one_way), pump(sr, cw, one_way));
                });
            }
        });
        DelayProxy { addr }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

/// Reads from `from` and writes each chunk to `to` `delay` after it was read.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, delay: Duration) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(IN_FLIGHT);
    let writer = tokio::spawn(async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; CHUNK];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx
                    .send((Instant::now() + delay, buf[..n].to_vec()))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bytes_arrive_intact_and_a_round_trip_costs_twice_the_one_way_delay() {
        // An echo server behind the proxy.
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = echo.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            loop {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    return;
                }
                s.write_all(&buf[..n]).await.unwrap();
            }
        });
        let one_way = Duration::from_millis(40);
        let proxy = DelayProxy::start(
            TcpListener::bind("127.0.0.1:0").await.unwrap(),
            echo_addr,
            one_way,
        )
        .await;
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let started = std::time::Instant::now();
        c.write_all(&payload).await.unwrap();
        let mut back = vec![0u8; payload.len()];
        c.read_exact(&mut back).await.unwrap();
        // A lower bound only: the bytes cannot come back before two one-way delays.
        assert!(started.elapsed() >= 2 * one_way, "{:?}", started.elapsed());
        assert!(back == payload, "bytes changed on the way");
    }
}
