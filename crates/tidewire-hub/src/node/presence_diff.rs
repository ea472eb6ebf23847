//! The joins and leaves of one channel that wait to go out together as
//! one `presence_diff` push.
//!
//! Pushing every join to every member costs members² pushes when a room
//! fills up (10,000 members joining at once: 100 million pushes, and send
//! queues that overflow however fast the clients read). So the joins and
//! leaves of a short interval are gathered into one push, and above a
//! member count the push says only how many joined and left, not who
//! (presence itself stays queryable). This module owns the gathering; the
//! node ([`super::channels`]) owns the timing and the delivery.

use std::sync::Arc;

use tokio::time::Instant;

use crate::protocol::{ClientInfo, Push};

/// What gathered since the channel's last `presence_diff` push.
#[derive(Debug)]
pub(crate) struct PendingDiff {
    joins: Vec<Arc<ClientInfo>>,
    leaves: Vec<Arc<ClientInfo>>,
    joined: u64,
    left: u64,
    /// Who joined and left is still known (the channel stayed small and
    /// the lists short); otherwise only the counts are.
    listed: bool,
    /// A timer will send what gathers (no push goes out before it).
    pub(crate) scheduled: bool,
    /// When the last push went out.
    pub(crate) last_sent: Option<Instant>,
}

impl Default for PendingDiff {
    fn default() -> Self {
        PendingDiff {
            joins: Vec::new(),
            leaves: Vec::new(),
            joined: 0,
            left: 0,
            listed: true,
            scheduled: false,
            last_sent: None,
        }
    }
}

impl PendingDiff {
    /// Records a join (or a leave) of `info`'s client. `members`: the
    /// channel's subscribers now; above `max_listed` only counts are kept.
    /// A leave cancels a join of the same client in the same interval (and
    /// the other way round): nothing changed that members need to hear.
    pub(crate) fn record(
        &mut self,
        info: &Arc<ClientInfo>,
        join: bool,
        members: usize,
        max_listed: usize,
    ) {
        if self.listed && members > max_listed {
            self.unlist();
        }
        if self.listed {
            let opposite = if join {
                &mut self.leaves
            } else {
                &mut self.joins
            };
            if let Some(at) = opposite.iter().position(|i| i.client == info.client) {
                opposite.remove(at);
                if join {
                    self.left -= 1;
                } else {
                    self.joined -= 1;
                }
                return;
            }
            // Churn in a small channel (joins and leaves of different
            // clients) could otherwise grow the lists without bound.
            if self.joins.len() + self.leaves.len() >= 2 * max_listed {
                self.unlist();
            }
        }
        if self.listed {
            if join {
                self.joins.push(info.clone());
            } else {
                self.leaves.push(info.clone());
            }
        }
        if join {
            self.joined += 1;
        } else {
            self.left += 1;
        }
    }

    /// Whether there are listed joins or leaves waiting (a publication of
    /// the channel sends them first, so that members learn who joined
    /// before they see what the newcomer published).
    pub(crate) fn has_listed(&self) -> bool {
        self.listed && self.joined + self.left > 0
    }

    /// What gathered, if anything did, and a fresh start. `members`: the
    /// channel's subscribers now.
    pub(crate) fn take(&mut self, members: usize, max_listed: usize) -> Option<TakenDiff> {
        let taken = (self.joined + self.left > 0).then(|| TakenDiff {
            joins: std::mem::take(&mut self.joins),
            leaves: std::mem::take(&mut self.leaves),
            joined: self.joined,
            left: self.left,
            listed: self.listed && members <= max_listed,
        });
        self.joined = 0;
        self.left = 0;
        self.listed = true;
        taken
    }

    fn unlist(&mut self) {
        self.listed = false;
        self.joins = Vec::new();
        self.leaves = Vec::new();
    }
}

/// One interval's joins and leaves, taken to go out as one push.
#[derive(Debug)]
pub(crate) struct TakenDiff {
    joins: Vec<Arc<ClientInfo>>,
    leaves: Vec<Arc<ClientInfo>>,
    joined: u64,
    left: u64,
    listed: bool,
}

impl TakenDiff {
    /// The `presence_diff` push of `channel` for it.
    pub(crate) fn push<'a>(&'a self, channel: &'a str) -> Push<'a> {
        Push::PresenceDiff {
            channel,
            joins: &self.joins,
            leaves: &self.leaves,
            joined: self.joined,
            left: self.left,
            listed: self.listed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Codec, JSON};

    fn client(id: &str) -> Arc<ClientInfo> {
        Arc::new(ClientInfo {
            client: id.into(),
            user: format!("u-{id}"),
            info: None,
        })
    }

    fn json(
        diff: &mut PendingDiff,
        channel: &str,
        members: usize,
        max: usize,
    ) -> serde_json::Value {
        let taken = diff.take(members, max).expect("a push");
        let frame = JSON.encode_push(&taken.push(channel));
        serde_json::from_str(frame.as_text().unwrap()).unwrap()
    }

    #[test]
    fn a_small_channel_lists_who_joined_and_left() {
        let mut diff = PendingDiff::default();
        diff.record(&client("a"), true, 1, 100);
        diff.record(&client("b"), true, 2, 100);
        diff.record(&client("old"), false, 1, 100);
        assert!(diff.has_listed());
        let push = json(&mut diff, "chat:x", 1, 100);
        assert_eq!(
            push,
            serde_json::json!({"push":{"channel":"chat:x","presence_diff":{
                "joined":2,"left":1,
                "joins":[{"client":"a","user":"u-a"},{"client":"b","user":"u-b"}],
                "leaves":[{"client":"old","user":"u-old"}]}}})
        );
        // Taken: nothing is left to send.
        assert!(diff.take(1, 100).is_none());
        assert!(!diff.has_listed());
    }

    #[test]
    fn a_join_and_leave_in_one_interval_cancel_out() {
        let mut diff = PendingDiff::default();
        diff.record(&client("a"), true, 1, 100);
        diff.record(&client("a"), false, 0, 100);
        assert!(diff.take(0, 100).is_none());
        // Leave then join again (unsubscribe and subscribe on one session).
        diff.record(&client("b"), false, 0, 100);
        diff.record(&client("b"), true, 1, 100);
        diff.record(&client("c"), true, 2, 100);
        let push = json(&mut diff, "c", 2, 100);
        assert_eq!(push["push"]["presence_diff"]["joined"], 1);
        assert_eq!(push["push"]["presence_diff"]["left"], 0);
        assert_eq!(push["push"]["presence_diff"]["joins"][0]["client"], "c");
        assert_eq!(
            push["push"]["presence_diff"]["leaves"],
            serde_json::json!([])
        );
    }

    #[test]
    fn a_big_channel_counts_only() {
        let mut diff = PendingDiff::default();
        for n in 0..99 {
            diff.record(&client(&n.to_string()), true, n + 1, 100);
        }
        assert!(diff.has_listed());
        // The 101st member: from now on this interval is counts only.
        diff.record(&client("x"), true, 101, 100);
        diff.record(&client("y"), true, 102, 100);
        diff.record(&client("x"), false, 101, 100);
        assert!(!diff.has_listed());
        assert!(diff.joins.is_empty(), "the lists are dropped, not kept");
        let push = json(&mut diff, "c", 101, 100);
        assert_eq!(
            push,
            serde_json::json!({"push":{"channel":"c","presence_diff":{"joined":101,"left":1}}})
        );
        // The next interval of a channel back under the limit lists again.
        diff.record(&client("z"), false, 100, 100);
        let push = json(&mut diff, "c", 100, 100);
        assert_eq!(push["push"]["presence_diff"]["leaves"][0]["client"], "z");
    }

    #[test]
    fn a_channel_that_grew_past_the_limit_before_the_push_counts_only() {
        let mut diff = PendingDiff::default();
        diff.record(&client("a"), true, 100, 100);
        let push = json(&mut diff, "c", 150, 100);
        assert!(push["push"]["presence_diff"].get("joins").is_none());
        assert_eq!(push["push"]["presence_diff"]["joined"], 1);
    }

    #[test]
    fn churn_in_a_small_channel_stays_bounded() {
        let mut diff = PendingDiff::default();
        for n in 0..10_000 {
            diff.record(&client(&format!("in{n}")), true, 50, 100);
            diff.record(&client(&format!("out{n}")), false, 49, 100);
        }
        assert!(diff.joins.len() + diff.leaves.len() <= 200);
        let push = json(&mut diff, "c", 50, 100);
        assert_eq!(push["push"]["presence_diff"]["joined"], 10_000);
        assert_eq!(push["push"]["presence_diff"]["left"], 10_000);
        assert!(push["push"]["presence_diff"].get("joins").is_none());
    }

    #[test]
    fn max_zero_never_lists() {
        let mut diff = PendingDiff::default();
        diff.record(&client("a"), true, 1, 0);
        diff.record(&client("b"), false, 0, 0);
        let push = json(&mut diff, "c", 0, 0);
        assert_eq!(
            push,
            serde_json::json!({"push":{"channel":"c","presence_diff":{"joined":1,"left":1}}})
        );
    }
}
