//! The waker a timer or a signal was last polled with, so that a poll which could only answer
//! pending again is skipped.
//!
//! A tokio `Sleep` (or a `watch` notification) keeps the waker of its last pending poll and wakes
//! it when it fires. Polling it again before then costs the task budget, a read of its state and
//! the waker compared and stored again, only to hear "pending". Whoever polls such a future on
//! every request (the client connection's idle timer, its drain signal, the HTTP/1.1 route
//! deadline) keeps a [`HeldWaker`] beside it and polls only when the future may have fired (its own
//! cheap check) or when the waker at hand is not the one it holds (another task polls now).

use std::task::{Context, Waker};

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

    /// Forgets the waker: the future was re-armed and must be polled again.
    pub(crate) fn clear(&mut self) {
        self.0 = None;
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
}
