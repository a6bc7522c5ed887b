//! Redis's per-command call counts (`INFO commandstats`), read over a plain TCP connection
//! (no Redis client needed), so a scenario can report what its own sending phase cost
//! Redis: commands per message, counted by Redis itself.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Calls per command (`xadd`, `smembers`, ...), summed over every address given (the shards of
/// a Redis Cluster).
pub(crate) async fn snapshot(addrs: &[String]) -> Result<BTreeMap<String, u64>> {
    let mut total = BTreeMap::new();
    for addr in addrs {
        let text = tokio::time::timeout(Duration::from_secs(5), info(addr))
            .await
            .with_context(|| format!("INFO commandstats from {addr}: timeout"))??;
        for (cmd, calls) in parse(&text) {
            *total.entry(cmd).or_default() += calls;
        }
    }
    Ok(total)
}

/// `after - before`, per command, without the zeros.
pub(crate) fn delta(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v.saturating_sub(*before.get(k).unwrap_or(&0))))
        .filter(|(_, v)| *v > 0)
        .collect()
}

async fn info(addr: &str) -> Result<String> {
    let mut s = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to Redis at {addr}"))?;
    s.write_all(b"*2\r\n$4\r\nINFO\r\n$12\r\ncommandstats\r\n")
        .await?;
    let mut buf = Vec::with_capacity(8192);
    loop {
        if let Some(end) = buf.windows(2).position(|w| w == b"\r\n") {
            if buf.first() != Some(&b'$') {
                bail!(
                    "unexpected reply from {addr}: {}",
                    String::from_utf8_lossy(&buf[..end])
                );
            }
            let len: usize = std::str::from_utf8(&buf[1..end])?.parse()?;
            if buf.len() >= end + 2 + len {
                return Ok(String::from_utf8_lossy(&buf[end + 2..end + 2 + len]).into_owned());
            }
        }
        if s.read_buf(&mut buf).await? == 0 {
            bail!("Redis at {addr} closed the connection");
        }
    }
}

/// `cmdstat_xadd:calls=12,usec=...` lines → (`xadd`, 12).
fn parse(text: &str) -> impl Iterator<Item = (String, u64)> + '_ {
    text.lines().filter_map(|l| {
        let (cmd, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
        let calls = rest.split(',').find_map(|kv| kv.strip_prefix("calls="))?;
        Some((cmd.to_owned(), calls.trim().parse().ok()?))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_calls_and_subtracts() {
        let a: BTreeMap<_, _> = parse(
            "# Commandstats\r\ncmdstat_xadd:calls=10,usec=20,usec_per_call=2.00\r\n\
             cmdstat_smembers:calls=3,usec=1\r\n",
        )
        .collect();
        assert_eq!(a["xadd"], 10);
        assert_eq!(a["smembers"], 3);
        let b = BTreeMap::from([("xadd".to_owned(), 25), ("smembers".to_owned(), 3)]);
        assert_eq!(delta(&a, &b), BTreeMap::from([("xadd".to_owned(), 15)]));
    }
}
