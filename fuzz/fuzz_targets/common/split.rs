//! The input layout the decoder targets share: byte 0 picks the limits, bytes 1..4 the chunk
//! sizes (cycled; 0 = all the rest), the remainder is the stream, decoded both in those chunks
//! and in one piece, which must give the same outcome.

use redmesh_resp::Limits;

/// Decodes `data`'s stream in its chunks and whole with `decode`; panics if they differ.
pub fn same_outcome_at_any_split<T: PartialEq + std::fmt::Debug>(
    data: &[u8],
    limits: &[Limits],
    decode: impl for<'a> Fn(Limits, std::vec::IntoIter<&'a [u8]>) -> T,
) {
    let Some((head, stream)) = data.split_first_chunk::<4>() else {
        return;
    };
    let limits = limits[usize::from(head[0]) % limits.len()];
    let sizes = head[1..]
        .iter()
        .map(|&b| if b == 0 { usize::MAX } else { usize::from(b) });
    let mut rest = stream;
    let chunks: Vec<&[u8]> = sizes
        .cycle()
        .map_while(|n| {
            let (chunk, tail) = rest.split_at(n.min(rest.len()));
            rest = tail;
            (!chunk.is_empty()).then_some(chunk)
        })
        .collect();
    let chunked = decode(limits, chunks.into_iter());
    assert_eq!(
        chunked,
        decode(limits, vec![stream].into_iter()),
        "outcome depends on the split"
    );
}
