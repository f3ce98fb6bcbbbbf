//! A minimal blocking HTTP/1.1 client for 127.0.0.1: what the examples, the tests and the load
//! generator (`retro bench serve`) call the server with. One request per connection; bodies
//! with `Content-Length` or chunked (server-sent events arrive chunked, read as they come).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// A whole response.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `POST path` with a JSON body, and `Authorization: Bearer key` when given.
pub fn post_json(
    addr: SocketAddr,
    path: &str,
    body: &str,
    key: Option<&str>,
) -> std::io::Result<Answer> {
    whole(addr, "POST", path, body.as_bytes(), key)
}

/// `GET path`.
pub fn get(addr: SocketAddr, path: &str, key: Option<&str>) -> std::io::Result<Answer> {
    whole(addr, "GET", path, b"", key)
}

fn whole(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
    key: Option<&str>,
) -> std::io::Result<Answer> {
    let mut answer = None;
    let mut bytes = vec![];
    stream(
        addr,
        method,
        path,
        body,
        key,
        &mut |status, headers, piece| {
            answer.get_or_insert((status, headers.to_vec()));
            bytes.extend_from_slice(piece);
            true
        },
    )?;
    let (status, headers) = answer.unwrap_or_default();
    Ok(Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    })
}

/// `POST path` and hands each server-sent event's `data` to `on_event` as it arrives, until it
/// returns false (the client hangs up) or the stream ends. Returns the status; a response that
/// is not an event stream (an error) comes whole as one call of `on_event`.
pub fn post_events(
    addr: SocketAddr,
    path: &str,
    body: &str,
    key: Option<&str>,
    on_event: &mut dyn FnMut(&str) -> bool,
) -> std::io::Result<u16> {
    let mut status = 0;
    let mut buf: Vec<u8> = vec![];
    let mut sse = None;
    stream(
        addr,
        "POST",
        path,
        body.as_bytes(),
        key,
        &mut |s, headers, piece| {
            status = s;
            let is_sse = *sse.get_or_insert_with(|| {
                headers
                    .iter()
                    .any(|(n, v)| n == "content-type" && v.starts_with("text/event-stream"))
            });
            buf.extend_from_slice(piece);
            if !is_sse {
                return true;
            }
            while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = buf.drain(..end + 2).collect();
                let event = String::from_utf8_lossy(&event);
                let data: Vec<&str> = event
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(|d| d.strip_prefix(' ').unwrap_or(d))
                    .collect();
                if !data.is_empty() && !on_event(&data.join("\n")) {
                    return false;
                }
            }
            true
        },
    )?;
    if sse == Some(false) || (sse.is_none() && !buf.is_empty()) {
        on_event(&String::from_utf8_lossy(&buf));
    }
    Ok(status)
}

/// What [`stream`] hands each piece of a body to: the status, the headers and the bytes; false
/// hangs up.
type OnPiece<'a> = dyn FnMut(u16, &[(String, String)], &[u8]) -> bool + 'a;

/// Sends one request and feeds the body's pieces, as they arrive, to `on_piece` (with the status
/// and headers) until it returns false.
fn stream(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
    key: Option<&str>,
    on_piece: &mut OnPiece,
) -> std::io::Result<()> {
    let mut conn = TcpStream::connect(addr)?;
    conn.set_read_timeout(Some(Duration::from_secs(600)))?;
    let auth = key
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    write!(
        conn,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n{auth}Connection: close\r\n\r\n",
        body.len()
    )?;
    conn.write_all(body)?;
    let mut r = BufReader::new(conn);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no HTTP status line"))?;
    let mut headers = vec![];
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((n, v)) = l.split_once(':') {
            headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let find = |n: &str| headers.iter().find(|(h, _)| h == n).map(|(_, v)| v.clone());
    if find("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| bad("bad chunk size"))?;
            if size == 0 {
                return Ok(());
            }
            let mut chunk = vec![0; size + 2];
            r.read_exact(&mut chunk)?;
            chunk.truncate(size);
            if !on_piece(status, &headers, &chunk) {
                return Ok(());
            }
        }
    }
    let mut rest = vec![];
    match find("content-length").and_then(|v| v.parse::<u64>().ok()) {
        Some(n) => {
            r.take(n).read_to_end(&mut rest)?;
        }
        None => {
            r.read_to_end(&mut rest)?;
        }
    }
    on_piece(status, &headers, &rest);
    Ok(())
}
