//! Commands past `client.max_batch` cost no memory to refuse: reading a
//! refused line's id keeps nothing, however many lines a message holds
//! (only the error replies themselves are allocated, by the session).
//! Its own test binary: the counting allocator sees only this test.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use tidewire_hub::protocol::{parse_batch, BatchItem};

struct Counting;

thread_local! {
    /// Counts only on the thread under test, while it is measuring.
    static MEASURING: Cell<bool> = const { Cell::new(false) };
    /// Bytes allocated and not yet freed since measuring started.
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if MEASURING.with(Cell::get) {
            ALLOCATIONS.with(|n| n.set(n.get() + 1));
            let live = LIVE.with(|l| {
                l.set(l.get() + layout.size() as isize);
                l.get()
            });
            PEAK.with(|p| p.set(p.get().max(live)));
        }
        System.alloc(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if MEASURING.with(Cell::get) {
            LIVE.with(|l| l.set(l.get() - layout.size() as isize));
        }
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn refusing_ten_thousand_commands_keeps_no_memory() {
    let mut message = String::new();
    for id in 1..=10_000u64 {
        message.push_str(&format!(
            "{{\"id\":{id},\"publish\":{{\"channel\":\"chat:lobby\",\"data\":{{\"text\":\"hi \\\"there\\\"\",\"n\":[[1],[2,[3]]]}}}}}}\n"
        ));
    }
    message.push_str("{\"\\u0069d\":10001,\"ping\":{}}\nnot json\n[1]\n{\"ping\":{}}\n");
    let mut ids = Vec::with_capacity(10_010);
    MEASURING.with(|m| m.set(true));
    for item in parse_batch(&message, 0) {
        match item {
            BatchItem::Refused { id, .. } => ids.push(id),
            BatchItem::Command(_) => unreachable!("the limit is 0"),
        }
    }
    MEASURING.with(|m| m.set(false));
    assert_eq!(ids.len(), 10_004);
    assert!(ids[..10_001].iter().copied().eq(1..=10_001));
    assert_eq!(ids[10_001..], [0, 0, 0]);
    // The JSON parser may use a scratch buffer per line (for nesting, or
    // an error it reports): given back before the next line, so what is
    // held at once stays small and nothing is left behind.
    let (peak, live) = (PEAK.with(Cell::get), LIVE.with(Cell::get));
    let allocations = ALLOCATIONS.with(Cell::get);
    assert!(
        peak < 1024,
        "{peak} bytes held at once ({allocations} allocations)"
    );
    assert_eq!(live, 0, "{live} bytes left behind");
}
