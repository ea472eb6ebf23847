//! The wake dispatcher: subscribers whose publications the fan-out
//! queued without waking them are woken here, a wave at a time.

use std::sync::{Arc, Weak};

use super::front::ClientSink;
use super::Node;
use crate::shards::lock;

/// Subscribers woken per wave: between two waves every other task that is
/// ready (a publisher's next command, say) gets its turn, so a command
/// waits behind at most one wave of subscriber writes rather than behind
/// the whole fan-out.
pub(super) const WAKE_WAVE: usize = 128;

/// Wakes subscribers whose publications were queued by the fan-out, a
/// wave at a time, in the order they became due. Each subscriber is woken
/// once however many publications were queued for it meanwhile, so its
/// task writes them all in one go.
pub(super) async fn dispatch_wakes(node: Weak<Node>, signal: Arc<tokio::sync::Notify>) {
    let mut wave: Vec<Arc<dyn ClientSink>> = Vec::with_capacity(WAKE_WAVE);
    loop {
        signal.notified().await;
        loop {
            let Some(node) = node.upgrade() else { return };
            {
                let mut due = lock(&node.wakes);
                let n = due.len().min(WAKE_WAVE);
                wave.extend(due.drain(..n));
                if due.is_empty() && due.capacity() > 4 * WAKE_WAVE {
                    // Give back the memory of a big fan-out.
                    *due = std::collections::VecDeque::new();
                }
            }
            drop(node);
            if wave.is_empty() {
                break;
            }
            for sink in wave.drain(..) {
                sink.wake();
            }
            tokio::task::yield_now().await;
        }
    }
}
