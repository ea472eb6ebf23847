//! The engine conformance suite: what every engine must do, checked
//! through the [`Engine`] trait only, so that the memory engine now and
//! the Redis and NATS engines next pass the same tests
//! ([`conformance_suite!`] writes them for a [`Harness`]). Among them a
//! model-based property test: random sequences of publications, clients
//! leaving and recovering, restarts and time passing, checked against a
//! small model of the streams.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use serde_json::value::RawValue;

use super::{
    BoxFuture, Engine, EngineEvents, EngineStats, HistoryOptions, HistoryQuery, HistoryResult,
    PresenceStats,
};
use crate::protocol::{ClientInfo, Payload, Position, Publication};
use crate::shards::lock;

/// How the suite gets engines and lets time pass for them.
pub(crate) trait Harness: Sync {
    /// A new engine with nothing in it, as after a restart.
    fn engine(&self) -> BoxFuture<'_, Arc<dyn Engine>>;
    /// Lets `secs` pass for `engine`, running its upkeep
    /// ([`Engine::maintain`]) as a node does (once a second).
    fn pass<'a>(&'a self, engine: &'a dyn Engine, secs: u64) -> BoxFuture<'a, ()>;
    /// Lets `secs` pass with no upkeep at all.
    fn advance(&self, secs: u64) -> BoxFuture<'_, ()>;
    /// What `engine` holds now (the memory engine counts it; a store
    /// elsewhere is asked).
    fn stored<'a>(&'a self, engine: &'a dyn Engine) -> BoxFuture<'a, EngineStats> {
        Box::pin(async move { engine.stats() })
    }
    /// Whether what expired stays until the upkeep drops it (the memory
    /// engine), rather than being gone at once (Redis).
    fn expires_lazily(&self) -> bool {
        true
    }
}

/// Writes the suite's tests for a harness (an expression of a type that
/// implements [`Harness`]); they run on tokio's paused clock.
macro_rules! conformance_suite {
    ($harness:expr) => {
        conformance_suite!(@all $harness; paused; 96);
    };
    // A harness over a real store: real time for its I/O (time passes
    // for the engine through the harness's own clock), fewer model cases.
    ($harness:expr, real_time, cases = $cases:expr) => {
        conformance_suite!(@all $harness; real; $cases);
    };
    (@all $harness:expr; $clock:ident; $cases:expr) => {
        conformance_suite!(@cases $harness; $clock; offsets_increase_per_channel_and_events_follow_in_order,
            history_is_bounded_by_size_and_queried_both_ways,
            recovery_is_complete_only_without_gaps_in_the_same_epoch,
            a_plain_read_creates_no_stream_and_its_empty_epoch_recovers_nothing,
            a_subscribe_read_starts_the_stream_at_offset_0_and_publications_continue_it,
            a_position_from_before_a_restart_does_not_recover,
            history_and_streams_expire_after_their_ttl,
            a_subscribed_stream_is_kept_past_its_ttl,
            a_stream_started_by_a_subscribe_is_forgotten_like_any_other,
            presence_is_removed_with_its_last_client,
            presence_expires_unless_added_again);

        proptest::proptest! {
            #![proptest_config(proptest::prelude::ProptestConfig::with_cases($cases))]
            #[test]
            fn recovery_matches_the_model(ops in $crate::engine::conformance::operations()) {
                let runtime = conformance_suite!(@runtime $clock);
                let harness = $harness;
                runtime.block_on($crate::engine::conformance::recovery_matches_the_model(
                    &harness, ops,
                ));
            }
        }
    };
    (@runtime paused) => {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap()
    };
    (@runtime real) => {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    (@cases $harness:expr; $clock:ident; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                let runtime = conformance_suite!(@runtime $clock);
                let harness = $harness;
                runtime.block_on($crate::engine::conformance::$case(&harness));
            }
        )*
    };
}

fn publication(text: &str) -> Publication {
    Publication {
        offset: 0,
        data: Payload::from_json(RawValue::from_string(format!("{text:?}")).unwrap()),
        info: None,
    }
}

#[derive(Default)]
struct Recorder(Mutex<Vec<(String, u64, String)>>);

impl Recorder {
    /// Waits (a bounded while) until `n` events came.
    async fn wait_for(&self, n: usize) {
        for _ in 0..500 {
            if lock(&self.0).len() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{n} events expected, got {:?}", lock(&self.0));
    }
}

impl EngineEvents for Recorder {
    fn publication(&self, channel: &str, p: &Arc<Publication>) {
        lock(&self.0).push((
            channel.into(),
            p.offset,
            String::from_utf8_lossy(p.data.as_bytes()).into(),
        ));
    }
    fn join(&self, channel: &str, info: &Arc<ClientInfo>) {
        lock(&self.0).push((channel.into(), 0, format!("join {}", info.client)));
    }
    fn leave(&self, channel: &str, info: &Arc<ClientInfo>) {
        lock(&self.0).push((channel.into(), 0, format!("leave {}", info.client)));
    }
    fn control(&self, message: &[u8]) {
        let text = String::from_utf8_lossy(message).into_owned();
        lock(&self.0).push((String::new(), 0, format!("control {text}")));
    }
    fn gap(&self, channel: &str) {
        lock(&self.0).push((channel.into(), 0, "gap".into()));
    }
}

const KEEP: HistoryOptions = HistoryOptions {
    size: 3,
    ttl: Duration::from_secs(60),
};

fn query(since: Option<u64>, limit: usize, reverse: bool) -> HistoryQuery {
    HistoryQuery {
        since,
        limit,
        reverse,
        start_stream: false,
        options: KEEP,
    }
}

/// The read of a subscribe: recovers from `since`, starts the stream.
fn subscribe_read(since: u64) -> HistoryQuery {
    HistoryQuery {
        start_stream: true,
        ..query(Some(since), KEEP.size, false)
    }
}

fn at(offset: u64, epoch: &str) -> Position {
    Position {
        offset,
        epoch: epoch.into(),
    }
}

fn offsets(r: &HistoryResult) -> Vec<u64> {
    r.publications.iter().map(|p| p.offset).collect()
}

pub(crate) async fn offsets_increase_per_channel_and_events_follow_in_order(h: &dyn Harness) {
    let engine = h.engine().await;
    let recorder = Arc::new(Recorder::default());
    let events: Arc<dyn EngineEvents> = recorder.clone();
    engine.set_events(Arc::downgrade(&events));
    // A node gets the events of the channels it is subscribed to.
    for channel in ["a", "b", "c"] {
        engine.subscribe(channel).await.unwrap();
    }
    let a1 = engine
        .publish("a", publication("1"), KEEP)
        .await
        .unwrap()
        .unwrap();
    let a2 = engine
        .publish("a", publication("2"), KEEP)
        .await
        .unwrap()
        .unwrap();
    let b1 = engine
        .publish("b", publication("x"), KEEP)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((a1.offset, a2.offset, b1.offset), (1, 2, 1));
    assert_eq!(a1.epoch, a2.epoch);
    assert_ne!(a1.epoch, b1.epoch);
    let none = engine
        .publish("c", publication("y"), HistoryOptions::NONE)
        .await
        .unwrap();
    assert!(none.is_none());
    // Events may come from another task, and channels do not wait for
    // each other: the order that holds is the one within a channel.
    recorder.wait_for(4).await;
    let mut seen: Vec<(String, u64)> = lock(&recorder.0)
        .iter()
        .map(|(c, o, _)| (c.clone(), *o))
        .collect();
    seen.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        seen,
        [
            ("a".into(), 1),
            ("a".into(), 2),
            ("b".into(), 1),
            ("c".into(), 0)
        ]
    );
    assert_eq!(h.stored(&*engine).await.streams, 2);
}

pub(crate) async fn history_is_bounded_by_size_and_queried_both_ways(h: &dyn Harness) {
    let engine = h.engine().await;
    for i in 1..=5 {
        engine
            .publish("a", publication(&i.to_string()), KEEP)
            .await
            .unwrap();
    }
    let all = engine.history("a", query(None, 10, false)).await.unwrap();
    assert_eq!(offsets(&all), [3, 4, 5]);
    assert_eq!(all.position.offset, 5);
    assert_eq!(
        offsets(
            &engine
                .history("a", query(Some(3), 10, false))
                .await
                .unwrap()
        ),
        [4, 5]
    );
    assert_eq!(
        offsets(&engine.history("a", query(None, 2, true)).await.unwrap()),
        [5, 4]
    );
    assert_eq!(
        offsets(&engine.history("a", query(Some(5), 1, true)).await.unwrap()),
        [4]
    );
    assert_eq!(
        offsets(&engine.history("a", query(None, 0, false)).await.unwrap()),
        [] as [u64; 0]
    );
}

pub(crate) async fn recovery_is_complete_only_without_gaps_in_the_same_epoch(h: &dyn Harness) {
    let engine = h.engine().await;
    for i in 1..=5 {
        engine
            .publish("a", publication(&i.to_string()), KEEP)
            .await
            .unwrap();
    }
    let r = engine
        .history("a", query(Some(3), 100, false))
        .await
        .unwrap();
    let epoch = r.position.epoch.to_string();
    let at = |offset| Position {
        offset,
        epoch: epoch.clone(),
    };
    assert!(r.recovers(&at(3)));
    assert!(engine
        .history("a", query(Some(5), 100, false))
        .await
        .unwrap()
        .recovers(&at(5)));
    // Offset 2 fell out of the 3-publication history: a gap.
    assert!(!engine
        .history("a", query(Some(1), 100, false))
        .await
        .unwrap()
        .recovers(&at(1)));
    // Another epoch, or an offset from the future.
    let other = Position {
        offset: 3,
        epoch: "other".into(),
    };
    assert!(!r.recovers(&other));
    assert!(!engine
        .history("a", query(Some(9), 100, false))
        .await
        .unwrap()
        .recovers(&at(9)));
}

pub(crate) async fn a_plain_read_creates_no_stream_and_its_empty_epoch_recovers_nothing(
    h: &dyn Harness,
) {
    let engine = h.engine().await;
    let r = engine
        .history("a", query(Some(0), 10, false))
        .await
        .unwrap();
    assert_eq!((r.position.offset, &*r.position.epoch), (0, ""));
    assert!(!r.recovers(&at(0, "")), "no stream proves nothing");
    assert_eq!(h.stored(&*engine).await.streams, 0);
    engine.publish("a", publication("1"), KEEP).await.unwrap();
    let r = engine
        .history("a", query(Some(0), 10, false))
        .await
        .unwrap();
    assert_eq!(offsets(&r), [1]);
    assert!(
        !r.recovers(&at(0, "")),
        "an empty epoch matches no stream, not even from its start"
    );
}

pub(crate) async fn a_subscribe_read_starts_the_stream_at_offset_0_and_publications_continue_it(
    h: &dyn Harness,
) {
    let engine = h.engine().await;
    let r = engine.history("a", subscribe_read(0)).await.unwrap();
    let epoch = r.position.epoch.to_string();
    assert_eq!(r.position.offset, 0);
    assert_eq!(epoch.len(), 12);
    assert!(r.recovers(&at(0, &epoch)));
    assert_eq!(h.stored(&*engine).await.streams, 1);
    // A second subscriber gets the same stream.
    let again = engine.history("a", subscribe_read(0)).await.unwrap();
    assert_eq!(again.position, r.position);
    for i in 1..=2 {
        let p = engine
            .publish("a", publication(&i.to_string()), KEEP)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((p.offset, &*p.epoch), (i, epoch.as_str()));
    }
    let r = engine.history("a", subscribe_read(0)).await.unwrap();
    assert_eq!(offsets(&r), [1, 2]);
    assert!(r.recovers(&at(0, &epoch)));
    assert!(!r.recovers(&at(0, "")));
    for i in 3..=5 {
        engine
            .publish("a", publication(&i.to_string()), KEEP)
            .await
            .unwrap();
    }
    // Offset 1 is gone (history of 3): not recoverable from the start.
    let r = engine.history("a", subscribe_read(0)).await.unwrap();
    assert!(!r.recovers(&at(0, &epoch)));
}

pub(crate) async fn a_position_from_before_a_restart_does_not_recover(h: &dyn Harness) {
    let before = h.engine().await;
    let seen = before.history("a", subscribe_read(0)).await.unwrap();
    // The restarted engine: the stream starts anew, with another epoch.
    let after = h.engine().await;
    after.publish("a", publication("1"), KEEP).await.unwrap();
    let r = after.history("a", subscribe_read(0)).await.unwrap();
    assert_ne!(r.position.epoch, seen.position.epoch);
    assert_eq!(offsets(&r), [1]);
    assert!(!r.recovers(&at(0, &seen.position.epoch)));
    // Nothing published since the restart: still another stream.
    let empty = h
        .engine()
        .await
        .history("a", subscribe_read(0))
        .await
        .unwrap();
    assert!(!empty.recovers(&at(0, &seen.position.epoch)));
}

pub(crate) async fn history_and_streams_expire_after_their_ttl(h: &dyn Harness) {
    let engine = h.engine().await;
    engine.publish("a", publication("1"), KEEP).await.unwrap();
    h.pass(&*engine, 30).await;
    engine.publish("a", publication("2"), KEEP).await.unwrap();
    h.pass(&*engine, 31).await;
    let r = engine.history("a", query(None, 10, false)).await.unwrap();
    assert_eq!(offsets(&r), [2]);
    let epoch = r.position.epoch.clone();
    assert_eq!(maintain_after(h, &engine, 30).await, EngineStats::default());
    // A new stream: new epoch, offsets from 1.
    let p = engine
        .publish("a", publication("3"), KEEP)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(p.offset, 1);
    assert_ne!(p.epoch, epoch);
}

/// Lets `secs` pass, runs the engine's upkeep and returns what it
/// holds then.
async fn maintain_after(h: &dyn Harness, engine: &Arc<dyn Engine>, secs: u64) -> EngineStats {
    h.pass(&**engine, secs).await;
    h.stored(&**engine).await
}

pub(crate) async fn a_subscribed_stream_is_kept_past_its_ttl(h: &dyn Harness) {
    let engine = h.engine().await;
    engine.subscribe("a").await.unwrap();
    engine.publish("a", publication("1"), KEEP).await.unwrap();
    assert_eq!(maintain_after(h, &engine, 120).await.streams, 1);
    engine.unsubscribe("a").await.unwrap();
    assert_eq!(maintain_after(h, &engine, 61).await, EngineStats::default());
}

pub(crate) async fn a_stream_started_by_a_subscribe_is_forgotten_like_any_other(h: &dyn Harness) {
    let engine = h.engine().await;
    // Never subscribed (the subscribe failed after its read): forgotten
    // ttl after its start.
    engine.history("a", subscribe_read(0)).await.unwrap();
    assert_eq!(maintain_after(h, &engine, 59).await.streams, 1);
    assert_eq!(maintain_after(h, &engine, 2).await, EngineStats::default());
    // Subscribed: kept however long; forgotten ttl after the unsubscribe.
    let epoch = engine
        .history("a", subscribe_read(0))
        .await
        .unwrap()
        .position
        .epoch;
    engine.subscribe("a").await.unwrap();
    assert_eq!(maintain_after(h, &engine, 600).await.streams, 1);
    engine.unsubscribe("a").await.unwrap();
    assert_eq!(maintain_after(h, &engine, 59).await.streams, 1);
    // Past its expiry but not dropped yet (no upkeep ran: the paused
    // clock moves alone): a subscribe's read keeps it another ttl, the
    // epoch it answers stays the stream's.
    h.advance(2).await;
    let kept = engine.history("a", subscribe_read(0)).await.unwrap();
    if h.expires_lazily() {
        assert_eq!(kept.position.epoch, epoch);
    } else {
        assert_ne!(kept.position.epoch, epoch, "expired: started anew");
    }
    assert_eq!(maintain_after(h, &engine, 59).await.streams, 1);
    assert_eq!(maintain_after(h, &engine, 2).await, EngineStats::default());
    let r = engine.history("a", subscribe_read(0)).await.unwrap();
    assert_ne!(r.position.epoch, epoch, "started anew");
    assert!(!r.recovers(&at(0, &epoch)));
}

pub(crate) async fn presence_is_removed_with_its_last_client(h: &dyn Harness) {
    let engine = h.engine().await;
    let info = |client: &str, user: &str| {
        Arc::new(ClientInfo {
            client: client.into(),
            user: user.into(),
            info: None,
        })
    };
    engine
        .add_presence("a", info("c1", "u1"), MINUTE)
        .await
        .unwrap();
    engine
        .add_presence("a", info("c2", "u1"), MINUTE)
        .await
        .unwrap();
    engine
        .add_presence("a", info("c3", "u2"), MINUTE)
        .await
        .unwrap();
    let stats = engine.presence_stats("a").await.unwrap();
    assert_eq!((stats.clients, stats.users), (3, 2));
    let who: Vec<String> = engine
        .presence("a")
        .await
        .unwrap()
        .iter()
        .map(|c| c.client.clone())
        .collect();
    assert_eq!(who, ["c1", "c2", "c3"]);
    for c in ["c1", "c2", "c3"] {
        engine.remove_presence("a", c).await.unwrap();
    }
    assert_eq!(h.stored(&*engine).await.presence_channels, 0);
    assert_eq!(
        engine.presence_stats("a").await.unwrap(),
        PresenceStats::default()
    );
}

const MINUTE: Duration = Duration::from_secs(60);

pub(crate) async fn presence_expires_unless_added_again(h: &dyn Harness) {
    let engine = h.engine().await;
    let info = |client: &str| {
        Arc::new(ClientInfo {
            client: client.into(),
            user: "u".into(),
            info: None,
        })
    };
    engine
        .add_presence("a", info("short"), Duration::from_secs(30))
        .await
        .unwrap();
    engine
        .add_presence("a", info("long"), MINUTE)
        .await
        .unwrap();
    h.pass(&*engine, 20).await;
    // Refreshed before it ran out: another 30 s from now.
    engine
        .add_presence("a", info("short"), Duration::from_secs(30))
        .await
        .unwrap();
    h.pass(&*engine, 20).await;
    assert_eq!(engine.presence_stats("a").await.unwrap().clients, 2);
    h.pass(&*engine, 11).await;
    // 31 s after its refresh "short" is gone; "long" (60 s) is not yet.
    let who: Vec<String> = engine
        .presence("a")
        .await
        .unwrap()
        .iter()
        .map(|c| c.client.clone())
        .collect();
    assert_eq!(who, ["long"]);
    h.pass(&*engine, 10).await;
    assert_eq!(
        engine.presence_stats("a").await.unwrap(),
        PresenceStats::default()
    );
    assert_eq!(
        h.stored(&*engine).await.presence_channels,
        0,
        "the channel's entry went too"
    );
}

/// One step of the model-based test.
#[derive(Debug, Clone)]
pub(crate) enum Operation {
    /// Publish this many publications.
    Publish(u8),
    /// The client goes away, keeping its last position.
    Leave,
    /// The client subscribes again with its last position (a subscribe's
    /// read: it starts the stream if there is none).
    Recover,
    /// The engine restarts: everything is lost.
    Restart,
    /// Time passes: this many 7-second steps (never a multiple of the
    /// 60-second TTL, so that no expiry falls on an exact boundary).
    Wait(u8),
}

const MODEL: HistoryOptions = HistoryOptions {
    size: 4,
    ttl: Duration::from_secs(60),
};

/// Sequences for [`recovery_matches_the_model`].
pub(crate) fn operations() -> impl Strategy<Value = Vec<Operation>> {
    proptest::collection::vec(
        prop_oneof![
            4 => (1u8..4).prop_map(Operation::Publish),
            2 => Just(Operation::Leave),
            3 => Just(Operation::Recover),
            1 => Just(Operation::Restart),
            2 => (1u8..12).prop_map(Operation::Wait),
        ],
        1..40,
    )
}

/// The model of one channel's stream.
#[derive(Debug, Default)]
struct ModelStream {
    epoch: Arc<str>,
    /// The newest offset.
    top: u64,
    /// Kept publications: (offset, when published), oldest first.
    kept: VecDeque<(u64, u64)>,
    /// The latest publication or stream-starting read.
    touched: u64,
}

/// Random steps against an engine and a model: a client that recovers
/// gets `recovered` exactly when the model says its position is still
/// there (same epoch, nothing missed fell out of history), and then
/// exactly the publications it missed, in order; offsets follow one
/// another within an epoch, and an epoch is never used twice.
pub(crate) async fn recovery_matches_the_model(h: &dyn Harness, operations: Vec<Operation>) {
    let mut engine = h.engine().await;
    let mut stream: Option<ModelStream> = None;
    let mut epochs: HashSet<Arc<str>> = HashSet::new();
    let mut now = 0u64;
    let mut position = Position {
        offset: 0,
        epoch: String::new(),
    };
    let mut away = true;
    let ttl = MODEL.ttl.as_secs();
    for operation in operations {
        match operation {
            Operation::Publish(n) => {
                for _ in 0..n {
                    let at = engine
                        .publish("m", publication("x"), MODEL)
                        .await
                        .unwrap()
                        .expect("a position with history");
                    let s = stream.get_or_insert_with(|| {
                        assert!(epochs.insert(at.epoch.clone()), "epoch used twice: {at:?}");
                        ModelStream {
                            epoch: at.epoch.clone(),
                            ..ModelStream::default()
                        }
                    });
                    assert_eq!(
                        at.epoch, s.epoch,
                        "the epoch changed without a restart or expiry"
                    );
                    s.top += 1;
                    assert_eq!(at.offset, s.top, "offsets follow one another");
                    s.kept.push_back((s.top, now));
                    while s.kept.len() > MODEL.size {
                        s.kept.pop_front();
                    }
                    s.touched = now;
                    if !away {
                        position.offset = s.top;
                    }
                }
            }
            Operation::Leave => away = true,
            Operation::Recover => {
                let r = engine
                    .history(
                        "m",
                        HistoryQuery {
                            since: Some(position.offset),
                            limit: MODEL.size,
                            reverse: false,
                            start_stream: true,
                            options: MODEL,
                        },
                    )
                    .await
                    .unwrap();
                let s = stream.get_or_insert_with(|| {
                    assert!(
                        epochs.insert(r.position.epoch.clone()),
                        "a restarted stream reused an epoch: {:?}",
                        r.position
                    );
                    ModelStream {
                        epoch: r.position.epoch.clone(),
                        ..ModelStream::default()
                    }
                });
                assert_eq!(r.position.epoch, s.epoch);
                assert_eq!(r.position.offset, s.top);
                s.touched = now;
                s.kept.retain(|(_, at)| at + ttl > now);
                let same_epoch = *position.epoch == *s.epoch;
                let first_missed = position.offset + 1;
                let expected = same_epoch
                    && position.offset <= s.top
                    && (position.offset == s.top
                        || s.kept.front().is_some_and(|(o, _)| *o <= first_missed));
                assert_eq!(
                    r.recovers(&position),
                    expected,
                    "recovered from {position:?} in {s:?}: {:?}",
                    offsets(&r)
                );
                if expected {
                    let missed: Vec<u64> = (first_missed..=s.top).collect();
                    assert_eq!(offsets(&r), missed);
                }
                position = Position {
                    offset: s.top,
                    epoch: s.epoch.to_string(),
                };
                away = false;
            }
            Operation::Restart => {
                engine = h.engine().await;
                stream = None;
                away = true;
            }
            Operation::Wait(steps) => {
                let secs = u64::from(steps) * 7;
                now += secs;
                h.pass(&*engine, secs).await;
                away = true;
                if let Some(s) = &mut stream {
                    s.kept.retain(|(_, at)| at + ttl > now);
                    if s.touched + ttl <= now {
                        stream = None;
                    }
                }
            }
        }
    }
}
