//! The waker a timer or a signal was last polled with, so that a poll which could only answer
//! pending again is skipped.
//!
//! A tokio `Sleep` (or a `watch` notification) keeps the waker of its last pending poll and wakes
//! it when it fires. Polling it again before then costs the task budget, a read of its state and
//! the waker compared and stored again, only to hear "pending". Whoever polls such a future on
//! every request (the client connection's idle timer, its drain signal, the HTTP/1.1 route
//! deadline) keeps a [`HeldWaker`] beside it and polls only when the future may have fired (its own
//! cheap check) or when the waker at hand is not the one it holds (another task polls now). The two
//! timers among them are a [`QuietSleep`], which pairs the two so that re-arming always forgets the
//! waker (a timer that fired has woken and dropped it).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio::time::{Instant, Sleep};

/// The waker a future was last polled pending with (`None`: not polled yet, or re-armed).
#[derive(Debug, Default)]
pub(crate) struct HeldWaker(Option<Waker>);

impl HeldWaker {
    /// Whether the future holds the waker of `cx` (a pointer comparison).
    pub(crate) fn holds(&self, cx: &Context<'_>) -> bool {
        self.0.as_ref().is_some_and(|w| w.will_wake(cx.waker()))
    }

    /// Notes a pending poll with `cx`: the future now holds its waker.
    pub(crate) fn polled_pending(&mut self, cx: &Context<'_>) {
        if !self.holds(cx) {
            self.0 = Some(cx.waker().clone());
        }
    }

    /// Forgets the waker: the future was re-armed and must be polled again (only a
    /// [`QuietSleep`] is re-armed).
    fn clear(&mut self) {
        self.0 = None;
    }
}

/// A tokio `Sleep` with the [`HeldWaker`] beside it: polled only when it may have fired or for
/// another task, and a [`reset`](QuietSleep::reset) always forgets the waker (a re-armed timer
/// must be polled again to be registered).
pub(crate) struct QuietSleep {
    sleep: Pin<Box<Sleep>>,
    held: HeldWaker,
}

impl QuietSleep {
    pub(crate) fn until(deadline: Instant) -> QuietSleep {
        QuietSleep {
            sleep: Box::pin(tokio::time::sleep_until(deadline)),
            held: HeldWaker::default(),
        }
    }

    pub(crate) fn deadline(&self) -> Instant {
        self.sleep.deadline()
    }

    /// Whether it has fired (one atomic load; no poll).
    pub(crate) fn is_elapsed(&self) -> bool {
        self.sleep.is_elapsed()
    }

    /// Re-arms it for `deadline`.
    pub(crate) fn reset(&mut self, deadline: Instant) {
        self.sleep.as_mut().reset(deadline);
        self.held.clear();
    }

    /// Ready once fired. While it has not and holds the waker of `cx`, this answers pending
    /// without polling the timer (which would only store the same waker again).
    pub(crate) fn poll_fired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.held.holds(cx) && !self.sleep.is_elapsed() {
            return Poll::Pending;
        }
        let r = self.sleep.as_mut().poll(cx);
        if r.is_pending() {
            self.held.polled_pending(cx);
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::task::Wake;

    struct Task;
    impl Wake for Task {
        fn wake(self: Arc<Self>) {}
    }

    #[test]
    fn a_held_waker_is_known_until_another_polls_or_it_is_cleared() {
        let (a, b) = (Waker::from(Arc::new(Task)), Waker::from(Arc::new(Task)));
        let (cx_a, cx_b) = (Context::from_waker(&a), Context::from_waker(&b));
        let mut held = HeldWaker::default();
        assert!(!held.holds(&cx_a));
        held.polled_pending(&cx_a);
        assert!(held.holds(&cx_a) && !held.holds(&cx_b));
        held.polled_pending(&cx_b);
        assert!(held.holds(&cx_b) && !held.holds(&cx_a));
        held.clear();
        assert!(!held.holds(&cx_b));
    }

    /// A fired timer has woken (and dropped) the waker it held: re-armed, it must be polled again
    /// to hold one, or the task waiting on it would never be woken.
    #[tokio::test(start_paused = true)]
    async fn a_quiet_sleep_re_armed_after_firing_wakes_its_task_again() {
        let second = std::time::Duration::from_secs(1);
        let mut t = QuietSleep::until(Instant::now() + second);
        std::future::poll_fn(|cx| {
            assert!(t.poll_fired(cx).is_pending());
            Poll::Ready(())
        })
        .await;
        tokio::time::advance(2 * second).await;
        assert!(t.is_elapsed());
        t.reset(Instant::now() + second);
        assert!(!t.is_elapsed());
        let start = Instant::now();
        let fired = tokio::time::timeout(10 * second, std::future::poll_fn(|cx| t.poll_fired(cx)));
        assert!(
            fired.await.is_ok(),
            "the re-armed timer never woke its task"
        );
        assert_eq!(Instant::now() - start, second);
        assert_eq!(t.deadline(), start + second);
    }
}
