//! Payload masking (RFC 6455 §5.3), word at a time.
//!
//! XOR with a repeating 4-byte key. The bulk is processed as `u64` words
//! built from the key rotated to the current position, which the compiler
//! turns into wide vector XORs; the tail goes byte by byte. No `unsafe`:
//! `chunks_exact_mut` with `from_le_bytes` compiles to plain loads and
//! stores (and is a byte swap away on a big-endian machine).

/// XORs `data` in place with `key`, as if `data` began at byte `offset` of
/// the payload (so a payload can be unmasked in pieces as it arrives).
/// Returns the key offset for the byte after `data`.
pub fn apply_mask(data: &mut [u8], key: [u8; 4], offset: usize) -> usize {
    let offset = offset & 3;
    // The key rotated so that its first byte is the one for `data[0]`:
    // little-endian, byte i of the word is byte i of the memory it is
    // stored to, so a right rotation by 8 bits moves the key one byte on.
    let rotated = u32::from_le_bytes(key).rotate_right(8 * offset as u32);
    let key_bytes = rotated.to_le_bytes();
    let word = u64::from(rotated) | (u64::from(rotated) << 32);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let v = u64::from_le_bytes((&*chunk).try_into().expect("chunk of 8")) ^ word;
        chunk.copy_from_slice(&v.to_le_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key_bytes[i & 3];
    }
    (offset + data.len()) & 3
}

/// The reference byte-at-a-time masking the fast path is tested against.
pub fn apply_mask_bytewise(data: &mut [u8], key: [u8; 4], offset: usize) -> usize {
    for (i, b) in data.iter_mut().enumerate() {
        *b ^= key[(offset + i) & 3];
    }
    (offset + data.len()) & 3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc6455_5_7_masked_hello() {
        let mut payload = *b"\x7f\x9f\x4d\x51\x58";
        apply_mask(&mut payload, [0x37, 0xfa, 0x21, 0x3d], 0);
        assert_eq!(&payload, b"Hello");
    }

    #[test]
    fn matches_bytewise_at_every_offset_and_length() {
        let key = [0xde, 0xad, 0xbe, 0xef];
        let source: Vec<u8> = (0..100u8).collect();
        for start in 0..8 {
            for len in 0..(source.len() - start) {
                for offset in 0..4 {
                    let mut fast = source[start..start + len].to_vec();
                    let mut slow = fast.clone();
                    let a = apply_mask(&mut fast, key, offset);
                    let b = apply_mask_bytewise(&mut slow, key, offset);
                    assert_eq!(fast, slow, "start {start} len {len} offset {offset}");
                    assert_eq!(a, b);
                }
            }
        }
    }

    #[test]
    fn unmasking_in_pieces_equals_unmasking_at_once() {
        let key = [1, 2, 3, 4];
        let original: Vec<u8> = (0..57u8).collect();
        let mut whole = original.clone();
        apply_mask(&mut whole, key, 0);
        let mut pieces = original.clone();
        let mut off = 0;
        for chunk in pieces.chunks_mut(7) {
            off = apply_mask(chunk, key, off);
        }
        assert_eq!(whole, pieces);
    }
}
