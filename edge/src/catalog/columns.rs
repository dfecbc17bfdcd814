//! Catalogue columns as MessagePack `bin`s of fixed-width little-endian values: decoding a
//! column is one pass over its bytes, where a MessagePack array of numbers is decoded value
//! by value (41 ms for a 100,000-video catalogue natively, the largest part of a cold start).
//!
//! Unsigned columns are stored at the narrowest width that holds their largest value (the
//! first byte says which: 1, 2, 4 or 8), so small numbers cost what MessagePack's
//! variable-width integers did; ratings and flags take one byte, times eight.

use std::fmt;
use std::marker::PhantomData;

use serde::{Deserializer, Serializer, de};

/// A column's element type.
pub(super) trait Column: Copy {
    fn encode(values: &[Self], out: &mut Vec<u8>);
    /// The values, or why `bytes` hold none (naming the row where one is invalid).
    fn decode(bytes: &[u8]) -> Result<Vec<Self>, String>;
}

/// Unsigned values at the narrowest of 1, 2, 4 or 8 bytes that holds them all.
fn encode_packed(values: impl Iterator<Item = u64> + Clone, out: &mut Vec<u8>) {
    let largest = values.clone().max().unwrap_or(0);
    let width: usize = match largest {
        0..=0xff => 1,
        0x100..=0xffff => 2,
        0x1_0000..=0xffff_ffff => 4,
        _ => 8,
    };
    out.push(width as u8);
    for value in values {
        out.extend_from_slice(&value.to_le_bytes()[..width]);
    }
}

/// `narrow` turns each value (at most `widest` bytes wide, so it fits) into the column's type.
fn decode_packed<T>(
    bytes: &[u8],
    widest: usize,
    narrow: impl Fn(u64) -> T,
) -> Result<Vec<T>, String> {
    let Some((&width, values)) = bytes.split_first() else {
        return Err("no width byte".to_owned());
    };
    let width = usize::from(width);
    if !matches!(width, 1 | 2 | 4 | 8) || width > widest {
        return Err(format!("a width of {width} bytes (at most {widest})"));
    }
    if !values.len().is_multiple_of(width) {
        return Err(format!("{} bytes of {width}-byte values", values.len()));
    }
    // One loop per width, each chunk a fixed-size load: a cold start decodes about a
    // million values, and the generic byte-by-byte loop was most of the catalogue's time.
    let array = |chunk: &[u8]| <[u8; 8]>::try_from(chunk).unwrap_or_default();
    Ok(match width {
        1 => values.iter().map(|&v| narrow(u64::from(v))).collect(),
        2 => values
            .chunks_exact(2)
            .map(|v| narrow(u64::from(u16::from_le_bytes([v[0], v[1]]))))
            .collect(),
        4 => values
            .chunks_exact(4)
            .map(|v| narrow(u64::from(u32::from_le_bytes([v[0], v[1], v[2], v[3]]))))
            .collect(),
        _ => values
            .chunks_exact(8)
            .map(|v| narrow(u64::from_le_bytes(array(v))))
            .collect(),
    })
}

impl Column for u64 {
    fn encode(values: &[Self], out: &mut Vec<u8>) {
        encode_packed(values.iter().copied(), out);
    }
    fn decode(bytes: &[u8]) -> Result<Vec<Self>, String> {
        decode_packed(bytes, 8, |v| v)
    }
}

impl Column for u32 {
    fn encode(values: &[Self], out: &mut Vec<u8>) {
        encode_packed(values.iter().map(|&v| u64::from(v)), out);
    }
    fn decode(bytes: &[u8]) -> Result<Vec<Self>, String> {
        // A width of at most 4 bytes: every value fits.
        decode_packed(bytes, 4, |v| v as u32)
    }
}

impl Column for i64 {
    fn encode(values: &[Self], out: &mut Vec<u8>) {
        out.extend(values.iter().flat_map(|v| v.to_le_bytes()));
    }
    fn decode(bytes: &[u8]) -> Result<Vec<Self>, String> {
        if !bytes.len().is_multiple_of(8) {
            return Err(format!("{} bytes of 8-byte values", bytes.len()));
        }
        Ok(bytes
            .chunks_exact(8)
            .map(|v| i64::from_le_bytes(v.try_into().expect("8 bytes")))
            .collect())
    }
}

/// One byte per value, each a code of `decode_byte`.
fn decode_bytes<T>(bytes: &[u8], decode_byte: impl Fn(u8) -> Option<T>) -> Result<Vec<T>, String> {
    bytes
        .iter()
        .enumerate()
        .map(|(row, &byte)| {
            decode_byte(byte).ok_or_else(|| format!("row {row} holds no valid value: {byte}"))
        })
        .collect()
}

impl Column for bool {
    fn encode(values: &[Self], out: &mut Vec<u8>) {
        out.extend(values.iter().map(|&v| u8::from(v)));
    }
    fn decode(bytes: &[u8]) -> Result<Vec<Self>, String> {
        decode_bytes(bytes, |byte| match byte {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        })
    }
}

impl Column for crate::ContentRating {
    fn encode(values: &[Self], out: &mut Vec<u8>) {
        out.extend(values.iter().map(|&rating| {
            Self::ALL
                .iter()
                .position(|&r| r == rating)
                .expect("every rating is in ALL") as u8
        }));
    }
    fn decode(bytes: &[u8]) -> Result<Vec<Self>, String> {
        decode_bytes(bytes, |byte| Self::ALL.get(usize::from(byte)).copied())
    }
}

pub(super) fn serialize<T: Column, S: Serializer>(
    values: &[T],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    let mut out = Vec::new();
    T::encode(values, &mut out);
    serializer.serialize_bytes(&out)
}

pub(super) fn deserialize<'de, T: Column, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<T>, D::Error> {
    struct Visitor<T>(PhantomData<T>);

    impl<T: Column> de::Visitor<'_> for Visitor<T> {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a bin of fixed-width values")
        }

        fn visit_bytes<E: de::Error>(self, bytes: &[u8]) -> Result<Vec<T>, E> {
            T::decode(bytes).map_err(E::custom)
        }
    }

    deserializer.deserialize_bytes(Visitor(PhantomData))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsigned_columns_take_the_narrowest_width_and_read_back() {
        for (values, width) in [
            (vec![0u64, 255], 1),
            (vec![3, 256], 2),
            (vec![70_000, 1], 4),
            (vec![u64::MAX, 0], 8),
            (vec![], 1),
        ] {
            let mut out = Vec::new();
            u64::encode(&values, &mut out);
            assert_eq!(out[0], width);
            assert_eq!(out.len(), 1 + values.len() * usize::from(width));
            assert_eq!(u64::decode(&out).unwrap(), values);
        }
        let mut wide = Vec::new();
        u64::encode(&[1 << 40], &mut wide);
        assert!(u32::decode(&wide).unwrap_err().contains("at most 4"));
        assert!(
            u64::decode(&[3, 0, 0, 0])
                .unwrap_err()
                .contains("width of 3")
        );
        assert!(
            u64::decode(&[2, 0, 0, 0])
                .unwrap_err()
                .contains("3 bytes of 2-byte")
        );
        assert!(u64::decode(&[]).unwrap_err().contains("no width byte"));
    }
}
