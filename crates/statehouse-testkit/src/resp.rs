//! A tiny RESP client over a plain `TcpStream`, used to poke at servers
//! without depending on a Redis client crate.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

/// Default I/O timeout of [`raw_command`].
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Sends one command to the Redis server listening on `127.0.0.1:port` over a
/// fresh plain TCP connection (RESP2) and returns the reply rendered as text.
///
/// Rendering rules:
///
/// * simple strings and bulk strings: their text (lossy UTF-8);
/// * integers: decimal text (e.g. `"-2"` for `TTL` of a missing key);
/// * errors: the error text, prefixed with `"ERR "` unless it already starts
///   with `"ERR"` (so `-WRONGTYPE ...` becomes `"ERR WRONGTYPE ..."` and
///   `-ERR unknown command ...` stays as is); check with
///   `reply.starts_with("ERR")`;
/// * null bulk strings / null arrays: `"(nil)"`;
/// * arrays: the rendered elements joined by `'\n'` (nested arrays are
///   flattened the same way; an empty array renders as `""`).
///
/// Connection failures (e.g. the server was killed) and protocol errors are
/// returned as `Err`. An empty `args` slice is rejected with
/// [`io::ErrorKind::InvalidInput`].
pub fn raw_command(port: u16, args: &[&str]) -> io::Result<String> {
    raw_command_timeout(port, args, DEFAULT_TIMEOUT)
}

/// [`raw_command`] with an explicit connect/read/write timeout.
pub(crate) fn raw_command_timeout(
    port: u16,
    args: &[&str],
    timeout: Duration,
) -> io::Result<String> {
    if args.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "raw_command: empty command",
        ));
    }
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    (&stream).write_all(&encode_command(args))?;
    let mut reader = BufReader::new(stream);
    let reply = read_reply(&mut reader)?;
    Ok(render(&reply))
}

/// Encodes a command as a RESP array of bulk strings.
fn encode_command(args: &[&str]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(16 + args.iter().map(|a| a.len() + 16).sum::<usize>());
    buf.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for arg in args {
        buf.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        buf.extend_from_slice(arg.as_bytes());
        buf.extend_from_slice(b"\r\n");
    }
    buf
}

/// A parsed reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    /// Simple string, bulk string, integer, double, big number, boolean...
    Text(String),
    /// Error reply (simple or blob error).
    Error(String),
    /// Null bulk string, null array or RESP3 null.
    Nil,
    /// Array, set, push or (flattened key/value) map.
    Array(Vec<Reply>),
}

fn protocol_error(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Reads one `\r\n`-terminated line, without the terminator.
fn read_line(r: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let mut line = Vec::new();
    let n = r.read_until(b'\n', &mut line)?;
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed before a complete reply",
        ));
    }
    if !line.ends_with(b"\r\n") {
        return Err(protocol_error("reply line not terminated by CRLF"));
    }
    line.truncate(line.len() - 2);
    Ok(line)
}

fn parse_len(bytes: &[u8]) -> io::Result<i64> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .ok_or_else(|| {
            protocol_error(format!(
                "bad length in reply: {:?}",
                String::from_utf8_lossy(bytes)
            ))
        })
}

/// Reads a length-prefixed blob (the `$`/`!`/`=` payload).
fn read_blob(r: &mut impl BufRead, len: i64) -> io::Result<Option<Vec<u8>>> {
    if len < 0 {
        return Ok(None);
    }
    let len = usize::try_from(len).map_err(|_| protocol_error("blob too large"))?;
    let mut data = vec![0u8; len + 2];
    r.read_exact(&mut data)?;
    if !data.ends_with(b"\r\n") {
        return Err(protocol_error("blob not terminated by CRLF"));
    }
    data.truncate(len);
    Ok(Some(data))
}

fn read_items(r: &mut impl BufRead, count: i64) -> io::Result<Reply> {
    if count < 0 {
        return Ok(Reply::Nil);
    }
    let mut items = Vec::new();
    for _ in 0..count {
        items.push(read_reply(r)?);
    }
    Ok(Reply::Array(items))
}

/// Parses one reply (RESP2, plus the common RESP3 types for robustness).
pub(crate) fn read_reply(r: &mut impl BufRead) -> io::Result<Reply> {
    let line = read_line(r)?;
    let Some((&kind, rest)) = line.split_first() else {
        return Err(protocol_error("empty reply line"));
    };
    let text = || String::from_utf8_lossy(rest).into_owned();
    match kind {
        b'+' | b':' | b',' | b'(' => Ok(Reply::Text(text())),
        b'-' => Ok(Reply::Error(text())),
        b'#' => Ok(Reply::Text(
            if rest == b"t" { "true" } else { "false" }.to_owned(),
        )),
        b'_' => Ok(Reply::Nil),
        b'$' => Ok(match read_blob(r, parse_len(rest)?)? {
            Some(data) => Reply::Text(String::from_utf8_lossy(&data).into_owned()),
            None => Reply::Nil,
        }),
        b'!' => Ok(match read_blob(r, parse_len(rest)?)? {
            Some(data) => Reply::Error(String::from_utf8_lossy(&data).into_owned()),
            None => Reply::Nil,
        }),
        b'=' => Ok(match read_blob(r, parse_len(rest)?)? {
            // Verbatim string: "txt:" / "mkd:" format prefix, then the text.
            Some(data) => {
                let body = if data.len() >= 4 && data[3] == b':' {
                    &data[4..]
                } else {
                    &data[..]
                };
                Reply::Text(String::from_utf8_lossy(body).into_owned())
            }
            None => Reply::Nil,
        }),
        b'*' | b'~' | b'>' => read_items(r, parse_len(rest)?),
        b'%' => read_items(r, parse_len(rest)?.saturating_mul(2)),
        b'|' => {
            // Attributes precede the actual reply; skip them.
            read_items(r, parse_len(rest)?.saturating_mul(2))?;
            read_reply(r)
        }
        other => Err(protocol_error(format!(
            "unknown reply type byte {:?}",
            char::from(other)
        ))),
    }
}

/// Renders a reply as described on [`raw_command`].
pub(crate) fn render(reply: &Reply) -> String {
    match reply {
        Reply::Text(s) => s.clone(),
        Reply::Error(e) if e.starts_with("ERR") => e.clone(),
        Reply::Error(e) => format!("ERR {e}"),
        Reply::Nil => "(nil)".to_owned(),
        Reply::Array(items) => items.iter().map(render).collect::<Vec<_>>().join("\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn parse(bytes: &[u8]) -> String {
        let mut c = Cursor::new(bytes.to_vec());
        render(&read_reply(&mut c).expect("valid reply"))
    }

    #[test]
    fn encodes_bulk_array() {
        assert_eq!(
            encode_command(&["SET", "k", ""]),
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n".to_vec()
        );
    }

    #[test]
    fn renders_scalars() {
        assert_eq!(parse(b"+PONG\r\n"), "PONG");
        assert_eq!(parse(b":-2\r\n"), "-2");
        assert_eq!(parse(b"$5\r\nhe\r\nl\r\n"), "he\r\nl");
        assert_eq!(parse(b"$0\r\n\r\n"), "");
        assert_eq!(parse(b"$-1\r\n"), "(nil)");
        assert_eq!(parse(b"*-1\r\n"), "(nil)");
    }

    #[test]
    fn renders_errors_with_err_prefix() {
        assert_eq!(parse(b"-ERR unknown command\r\n"), "ERR unknown command");
        assert_eq!(
            parse(b"-WRONGTYPE Operation against a key\r\n"),
            "ERR WRONGTYPE Operation against a key"
        );
        assert_eq!(
            parse(b"-MOVED 3999 127.0.0.1:7001\r\n"),
            "ERR MOVED 3999 127.0.0.1:7001"
        );
    }

    #[test]
    fn renders_arrays_joined_by_newline() {
        assert_eq!(parse(b"*3\r\n$3\r\nfoo\r\n:1\r\n$-1\r\n"), "foo\n1\n(nil)");
        assert_eq!(parse(b"*2\r\n*1\r\n+a\r\n+b\r\n"), "a\nb");
        assert_eq!(parse(b"*0\r\n"), "");
    }

    #[test]
    fn truncated_reply_is_an_error() {
        let mut c = Cursor::new(b"$10\r\nabc".to_vec());
        assert!(read_reply(&mut c).is_err());
        let mut c = Cursor::new(Vec::new());
        assert!(read_reply(&mut c).is_err());
    }
}
