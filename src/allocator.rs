//! The global allocator: mimalloc, entered through `mi_malloc` and its family whenever the
//! alignment asked for is one every mimalloc block already has.
//!
//! The `mimalloc` crate's `MiMalloc` passes every Rust allocation to `mi_malloc_aligned`, even
//! with an alignment of 1 or 8. mimalloc 3 serves that from its fast path only for a block of
//! up to 1 KiB with a free block of the right size ready; anything else (a request's boxed
//! future, a header map, a body buffer) goes through `mi_malloc_is_naturally_aligned` and then
//! over-allocates by `alignment - 1` bytes into a larger size class. At 64 connections that
//! was about 1.4 k instructions a request (docs/performance.md, "a fourth pass").
//!
//! Every mimalloc block is a whole number of machine words and starts on a word boundary (a
//! page's first block is 16-aligned, and block sizes are multiples of 8 bytes), so an
//! alignment up to a word needs nothing more than `mi_malloc`. Larger alignments keep the
//! aligned entry points.
//!
//! Kept in the binary (and shared with the stack floor of `make bench`), not the library,
//! which forbids `unsafe`.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// The alignment every mimalloc block has: one machine word.
const WORD: usize = std::mem::size_of::<usize>();

/// mimalloc through its plain entry points where the alignment allows.
pub struct Mimalloc;

fn word_aligned(align: usize) -> bool {
    align <= WORD
}

// SAFETY: every method forwards to mimalloc, which returns null or a block of at least `size`
// bytes that stays valid until `mi_free`. Blocks from `mi_malloc`, `mi_zalloc` and `mi_realloc`
// are word-aligned, so they are used only when the layout asks for no more than a word; larger
// alignments go to the `_aligned` functions, which honour any power of two. `mi_free` and
// `mi_realloc` accept blocks from either family.
unsafe impl GlobalAlloc for Mimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let block = if word_aligned(layout.align()) {
            mi::mi_malloc(layout.size())
        } else {
            mi::mi_malloc_aligned(layout.size(), layout.align())
        };
        block.cast()
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let block = if word_aligned(layout.align()) {
            mi::mi_zalloc(layout.size())
        } else {
            mi::mi_zalloc_aligned(layout.size(), layout.align())
        };
        block.cast()
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        mi::mi_free(ptr.cast::<c_void>());
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let block = if word_aligned(layout.align()) {
            mi::mi_realloc(ptr.cast::<c_void>(), new_size)
        } else {
            mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align())
        };
        block.cast()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Allocates, fills, grows or shrinks and frees one block the way a collection would, and
    /// checks what a caller relies on: the alignment asked for, zeroed memory from
    /// `alloc_zeroed`, and the contents kept across `realloc`.
    fn round_trip(size: usize, new_size: usize, align: usize, zeroed: bool) {
        let layout = Layout::from_size_align(size, align).unwrap();
        unsafe {
            let ptr = if zeroed {
                Mimalloc.alloc_zeroed(layout)
            } else {
                Mimalloc.alloc(layout)
            };
            assert!(!ptr.is_null());
            assert_eq!(ptr as usize % align, 0, "{size} bytes aligned to {align}");
            if zeroed {
                assert!(std::slice::from_raw_parts(ptr, size)
                    .iter()
                    .all(|b| *b == 0));
            }
            for i in 0..size {
                ptr.add(i).write(i as u8);
            }
            let moved = Mimalloc.realloc(ptr, layout, new_size);
            assert!(!moved.is_null());
            assert_eq!(
                moved as usize % align,
                0,
                "{size} -> {new_size} bytes aligned to {align}"
            );
            for i in 0..size.min(new_size) {
                assert_eq!(moved.add(i).read(), i as u8, "byte {i} kept by realloc");
            }
            Mimalloc.dealloc(moved, Layout::from_size_align(new_size, align).unwrap());
        }
    }

    proptest! {
        #[test]
        fn blocks_are_aligned_zeroed_and_kept_across_realloc(
            size in 1usize..20_000,
            new_size in 1usize..20_000,
            align_log2 in 0u32..13,
            zeroed in any::<bool>(),
        ) {
            round_trip(size, new_size, 1 << align_log2, zeroed);
        }
    }

    /// Sizes that are not a multiple of 16 land in word-sized size classes (24, 40, 56 bytes);
    /// an alignment of 16 must still be honoured there, which plain `mi_malloc` would not do.
    #[test]
    fn sixteen_byte_alignment_holds_in_word_sized_classes() {
        for size in [8, 24, 40, 56, 72, 88, 104, 1032, 6808] {
            for _ in 0..64 {
                round_trip(size, size + 8, 16, false);
            }
        }
    }
}
