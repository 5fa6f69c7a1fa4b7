//! The committer's batching rule for delivery state records, on a real spool and real
//! syncer threads: with `state_commit_delay`, a state record queued when no message is
//! waits for the next message and shares its fdatasync; without it, it takes one alone.

mod common;

use std::time::Duration;

use bytes::Bytes;
use tern_queue::{GroupCommit, MsgId, MsgRef, RcptState, StateChange};

/// Runs `script` with a fresh spool's committer (one in flight at a time, so the batches
/// are easy to count) and returns its statistics afterwards.
fn with_commit<F, Fut>(delay: Duration, script: F) -> tern_queue::commit::CommitStats
where
    F: FnOnce(GroupCommit) -> Fut + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    common::on_executor(async move {
        let commit = GroupCommit::with_commits_in_flight(common::open_spool(&path), 1);
        commit.set_state_commit_delay(delay);
        script(commit.clone()).await;
        commit.stats()
    })
}

/// Stores a one-recipient message; its place and id.
async fn store(commit: &GroupCommit) -> (MsgRef, MsgId) {
    let mut env = common::envelope("from@example.org", &[("a@example.net", 0, None)]);
    let body = Bytes::from_static(b"Subject: t\r\n\r\nhello\r\n");
    env.size = body.len() as u64;
    let w = commit.with_spool(|s| {
        env.id = s.id_gen().next();
        s.prepare(&env, std::slice::from_ref(&body)).unwrap()
    });
    let c = commit.commit(w).await.unwrap();
    let r = MsgRef {
        shard: 0,
        segment: c.segment,
        offset: c.offset,
    };
    (r, c.id)
}

fn delivered(msg: MsgRef, id: MsgId) -> StateChange {
    StateChange {
        msg,
        id,
        updates: vec![(0, RcptState::Delivered)],
        attempts: 1,
        next_attempt_unix: 0,
        last_reply: "250 ok".into(),
        warned: false,
        held: false,
    }
}

/// Stores A, records A delivered, then stores B while A's state record is queued.
async fn message_state_message(commit: GroupCommit) {
    let (r, id) = store(&commit).await;
    let c2 = commit.clone();
    let state = glommio::spawn_local(async move { c2.commit_state(&delivered(r, id)).await });
    // Let the state record reach the queue (and, without a delay, its own batch start).
    glommio::yield_if_needed().await;
    futures_lite::future::yield_now().await;
    store(&commit).await;
    state.await.expect("state record committed");
}

#[test]
fn a_state_record_queued_alone_waits_for_the_next_message_and_shares_its_fdatasync() {
    // A delay far longer than the test: only B's arrival can start the state record.
    let st = with_commit(Duration::from_secs(3600), message_state_message);
    assert_eq!(
        st.batch_messages.count, 2,
        "A alone, then B with A's state record"
    );
    assert_eq!(st.batch_states.sum, 1);
    assert_eq!(
        st.messages_sharing, 1,
        "B shared its batch with the state record"
    );
}

#[test]
fn without_a_delay_a_state_record_queued_alone_takes_an_fdatasync_of_its_own() {
    let st = with_commit(Duration::ZERO, message_state_message);
    assert_eq!(st.batch_states.sum, 1);
    assert_eq!(st.messages_sharing, 0, "the state record went alone");
    assert_eq!(st.batch_messages.count, 3);
}

#[test]
fn a_state_record_with_no_message_after_it_still_commits_once_the_delay_is_over() {
    let st = with_commit(Duration::from_millis(30), |commit| async move {
        let (r, id) = store(&commit).await;
        commit
            .commit_state(&delivered(r, id))
            .await
            .expect("state record committed without any further message");
    });
    assert_eq!(st.batch_messages.count, 2);
    assert_eq!(st.messages_sharing, 0);
}

/// Waits for `f`, but gives up after 60 s (a guard against a hang, not a timing claim).
async fn within_a_minute<T>(f: impl std::future::Future<Output = T>) -> Option<T> {
    futures_lite::future::or(async { Some(f.await) }, async {
        glommio::timer::sleep(Duration::from_secs(60)).await;
        None
    })
    .await
}

#[test]
fn a_state_record_waits_for_nothing_when_no_message_came_lately() {
    // A queue being drained after a restart: no message arrives, so a delivery's state
    // record must not wait out the (here very long) delay.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let p1 = path.clone();
    let (r, id) = common::on_executor(async move {
        let commit = GroupCommit::with_commits_in_flight(common::open_spool(&p1), 1);
        store(&commit).await
    });
    let done = common::on_executor(async move {
        let commit = GroupCommit::with_commits_in_flight(common::open_spool(&path), 1);
        commit.set_state_commit_delay(Duration::from_secs(3600));
        within_a_minute(commit.commit_state(&delivered(r, id))).await
    });
    assert!(
        matches!(done, Some(Ok(_))),
        "the state record waited for a message that was not coming: {done:?}"
    );
}

#[test]
fn a_state_record_a_session_waits_for_starts_at_once() {
    let st = with_commit(Duration::from_secs(3600), |commit| async move {
        let (r, id) = store(&commit).await;
        let done = within_a_minute(commit.commit_state_now(&delivered(r, id))).await;
        assert!(matches!(done, Some(Ok(_))), "{done:?}");
    });
    assert_eq!(
        st.batch_messages.count, 2,
        "the message, then the state record alone"
    );
    assert_eq!(st.messages_sharing, 0);
}
