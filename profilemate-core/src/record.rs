//! The fixed-size records that recording threads write and the collector reads.
//!
//! Every event is one 64-byte slot; text (request ids, context, extra info) that does not fit
//! in the slot's inline space continues in following slots, committed together with the head
//! slot, so the collector never sees half an event.

use crate::ring::{RingConsumer, RingProducer};
use crate::types::DropReason;

/// The longest text one event may carry, all its fields together, in bytes. Longer events are
/// dropped and counted as [`DropReason::TextTooLong`].
pub const MAX_TEXT_BYTES: usize = 4096;

// The ring's element: one record is one or more slots (the layout is below, in `impl Slot`).
pub(crate) use crate::ring::{Slot, SLOT};

pub(crate) const K_FORWARD: u8 = 1;
pub(crate) const K_CPU: u8 = 2;
pub(crate) const K_BATCH: u8 = 3;
pub(crate) const K_LIFECYCLE: u8 = 4;
pub(crate) const K_COMPONENT: u8 = 5;
pub(crate) const K_KV_CACHE: u8 = 6;
pub(crate) const K_CUDA_GRAPH: u8 = 7;
pub(crate) const K_MOE: u8 = 8;
/// A step closed by a [`StepGuard`](crate::StepGuard): word 1 its start, word 2 its end.
pub(crate) const K_STEP: u8 = 9;

/// Step ids are kept in bytes 3..8 of every head slot: 40 bits, 0 meaning "outside any step".
pub(crate) const MAX_STEP_ID: u64 = (1 << 40) - 1;

/// Word 2 holds a duration in nanoseconds rather than an end reading.
pub(crate) const F_DURATION: u8 = 1;
/// Words 3 and 4 hold timing-backend marks.
pub(crate) const F_DEVICE: u8 = 2;

/// Where inline text starts, per kind.
pub(crate) const CPU_TEXT_AT: usize = 32;
pub(crate) const COMPONENT_TEXT_AT: usize = 48;
pub(crate) const LIFECYCLE_TEXT_AT: usize = 24;
pub(crate) const MOE_DATA_AT: usize = 32;
/// Flag on a CUDA graph record: word 4 holds a padded batch size.
pub(crate) const F_PADDED: u8 = 4;

impl Slot {
    #[inline(always)]
    pub(crate) fn head(kind: u8, tag: u8, flags: u8) -> Slot {
        let mut s = Slot::ZERO;
        s.0[0] = kind;
        s.0[1] = tag;
        s.0[2] = flags;
        s
    }

    #[inline(always)]
    pub(crate) fn kind(&self) -> u8 {
        self.0[0]
    }
    #[inline(always)]
    pub(crate) fn tag(&self) -> u8 {
        self.0[1]
    }
    #[inline(always)]
    pub(crate) fn flags(&self) -> u8 {
        self.0[2]
    }
    /// The step the event belongs to (0: none), bytes 3..8.
    #[inline(always)]
    pub(crate) fn step(&self) -> u64 {
        self.word(0) >> 24
    }
    /// Sets the step id (at most [`MAX_STEP_ID`]; the caller masks).
    #[inline(always)]
    pub(crate) fn set_step(&mut self, step: u64) {
        let low = self.word(0) & 0xff_ffff;
        self.set_word(0, low | (step << 24));
    }
    #[inline(always)]
    pub(crate) fn word(&self, i: usize) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[i * 8..i * 8 + 8]);
        u64::from_le_bytes(b)
    }
    #[inline(always)]
    pub(crate) fn set_word(&mut self, i: usize, v: u64) {
        self.0[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    #[inline(always)]
    pub(crate) fn set_pair(&mut self, i: usize, lo: u32, hi: u32) {
        self.set_word(i, u64::from(lo) | (u64::from(hi) << 32));
    }
    #[inline(always)]
    pub(crate) fn pair(&self, i: usize) -> (u32, u32) {
        let w = self.word(i);
        (w as u32, (w >> 32) as u32)
    }
}

/// Copies a sequence of byte strings into consecutive destinations.
struct TextCursor<'a> {
    pieces: &'a [&'a [u8]],
    piece: usize,
    offset: usize,
}

impl<'a> TextCursor<'a> {
    fn new(pieces: &'a [&'a [u8]]) -> Self {
        TextCursor { pieces, piece: 0, offset: 0 }
    }

    /// Fills as much of `dst` as there is text left.
    #[inline]
    fn fill(&mut self, dst: &mut [u8]) {
        let mut at = 0;
        while at < dst.len() && self.piece < self.pieces.len() {
            let src = &self.pieces[self.piece][self.offset..];
            let n = src.len().min(dst.len() - at);
            dst[at..at + n].copy_from_slice(&src[..n]);
            at += n;
            self.offset += n;
            if self.offset == self.pieces[self.piece].len() {
                self.piece += 1;
                self.offset = 0;
            }
        }
    }
}

/// Pushes a slot that carries no text.
#[inline(always)]
pub(crate) fn push_plain(p: &mut RingProducer, slot: Slot) -> Result<(), DropReason> {
    p.push(slot).map_err(|()| DropReason::BufferFull)
}

/// Pushes `head` followed by `texts`, starting inline at byte `inline_at` of the head slot.
#[inline(always)]
pub(crate) fn push_with_text(
    p: &mut RingProducer,
    head: Slot,
    inline_at: usize,
    texts: &[&[u8]],
) -> Result<(), DropReason> {
    let total: usize = texts.iter().map(|t| t.len()).sum();
    if total > MAX_TEXT_BYTES {
        return Err(DropReason::TextTooLong);
    }
    let inline_cap = SLOT - inline_at;
    if total <= inline_cap {
        // The common case: everything fits in the head slot, written in place.
        return p
            .push_in_place(|dst| {
                *dst = head;
                let mut at = inline_at;
                for t in texts {
                    dst.0[at..at + t.len()].copy_from_slice(t);
                    at += t.len();
                }
            })
            .map_err(|()| DropReason::BufferFull);
    }
    push_spilled(p, head, inline_at, texts, total)
}

/// Text that continues past the head slot: a chunk of slots committed at once.
#[inline(never)]
fn push_spilled(
    p: &mut RingProducer,
    mut head: Slot,
    inline_at: usize,
    texts: &[&[u8]],
    total: usize,
) -> Result<(), DropReason> {
    let inline_cap = SLOT - inline_at;
    let mut cursor = TextCursor::new(texts);
    let extra = (total - inline_cap).div_ceil(SLOT);
    cursor.fill(&mut head.0[inline_at..]);
    p.push_many(1 + extra as u64, |i, dst| if i == 0 { *dst = head } else { cursor.fill(&mut dst.0) })
        .map_err(|()| DropReason::BufferFull)
}

/// Reads `total` bytes of text: the inline part of `head` from `inline_at`, then whole
/// continuation slots from `rest`.
pub(crate) fn read_text<'s>(
    head: &Slot,
    inline_at: usize,
    total: usize,
    rest: &mut impl Iterator<Item = &'s Slot>,
    out: &mut Vec<u8>,
) {
    let inline = total.min(SLOT - inline_at);
    out.extend_from_slice(&head.0[inline_at..inline_at + inline]);
    let mut left = total - inline;
    while left > 0 {
        let Some(s) = rest.next() else { break };
        let n = left.min(SLOT);
        out.extend_from_slice(&s.0[..n]);
        left -= n;
    }
}

/// Drains every complete event currently in `c`, calling `f` with each head slot and an
/// iterator positioned at its continuation slots.
pub(crate) fn drain<F>(c: &mut RingConsumer, f: F) -> usize
where
    F: for<'s> FnMut(&'s Slot, &mut dyn Iterator<Item = &'s Slot>),
{
    c.drain(f)
}
