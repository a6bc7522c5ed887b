//! Reading Redis stream replies: entry ids and the RESP2/RESP3 shapes of `XREAD`,
//! `XREADGROUP` and `XAUTOCLAIM` replies, shared by every stream reader (the inbox reader,
//! ingress).

use redis::Value;

/// A stream entry id, `ms-seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct EntryId {
    ms: u64,
    seq: u64,
}

impl EntryId {
    /// Parses `ms-seq`.
    pub fn parse(s: &[u8]) -> Option<Self> {
        let s = std::str::from_utf8(s).ok()?;
        let (ms, seq) = s.split_once('-')?;
        Some(Self {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }

    /// Its milliseconds part (Redis server time when it was added).
    pub fn ms(self) -> u64 {
        self.ms
    }

    /// The smallest id after this one.
    pub fn next(self) -> Self {
        match self.seq.checked_add(1) {
            Some(seq) => Self { ms: self.ms, seq },
            None => Self {
                ms: self.ms + 1,
                seq: 0,
            },
        }
    }
}

impl std::fmt::Display for EntryId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// The entries of an `XREAD` reply for one stream (RESP2 or RESP3 shape).
pub fn stream_entries(reply: Value) -> Option<Vec<Value>> {
    let stream = match reply {
        Value::Array(mut streams) if !streams.is_empty() => streams.swap_remove(0),
        Value::Map(mut streams) if !streams.is_empty() => {
            let (key, entries) = streams.swap_remove(0);
            Value::Array(vec![key, entries])
        }
        _ => return None,
    };
    match stream {
        Value::Array(mut pair) if pair.len() == 2 => match pair.swap_remove(1) {
            Value::Array(entries) => Some(entries),
            _ => None,
        },
        _ => None,
    }
}

/// An entry's id and its flat field/value list.
pub fn entry_parts(entry: &Value) -> Option<(EntryId, &[Value])> {
    let Value::Array(parts) = entry else {
        return None;
    };
    let [Value::BulkString(id), Value::Array(fields)] = parts.as_slice() else {
        return None;
    };
    Some((EntryId::parse(id)?, fields))
}

/// The value of field `name` in a flat field/value list.
pub fn field<'a>(fields: &'a [Value], name: &str) -> Option<&'a [u8]> {
    fields.chunks_exact(2).find_map(|kv| match kv {
        [Value::BulkString(k), Value::BulkString(v)] if k == name.as_bytes() => Some(v.as_slice()),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_ids_parse_and_advance() {
        let id = EntryId::parse(b"1700000000000-5").unwrap();
        assert_eq!(id.to_string(), "1700000000000-5");
        assert_eq!(id.next().to_string(), "1700000000000-6");
        let max = EntryId {
            ms: 7,
            seq: u64::MAX,
        };
        assert_eq!(max.next().to_string(), "8-0");
        assert!(EntryId::parse(b"x-1").is_none());
        assert!(EntryId::parse(b"12").is_none());
    }

    #[test]
    fn reads_entries_out_of_an_xread_reply() {
        let bulk = |s: &[u8]| Value::BulkString(s.to_vec());
        let reply = Value::Array(vec![Value::Array(vec![
            bulk(b"inbox"),
            Value::Array(vec![Value::Array(vec![
                bulk(b"1-1"),
                Value::Array(vec![bulk(b"from"), bulk(b"a"), bulk(b"env"), bulk(b"\x80")]),
            ])]),
        ])]);
        let entries = stream_entries(reply).unwrap();
        let (id, fields) = entry_parts(&entries[0]).unwrap();
        assert_eq!(id, EntryId { ms: 1, seq: 1 });
        assert_eq!(field(fields, "env"), Some(&b"\x80"[..]));
        assert_eq!(field(fields, "to"), None);
        assert!(stream_entries(Value::Nil).is_none());
        assert!(entry_parts(&bulk(b"junk")).is_none());
    }
}
