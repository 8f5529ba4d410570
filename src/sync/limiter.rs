//! Per-shop adaptive concurrency: how many requests a sync may have in
//! flight against one shop.
//!
//! The limit starts at `sync.shop_concurrency` (its ceiling) and follows
//! AIMD, the way TCP treats a congested link: a request the shop answered
//! with backpressure (429, 503, or any `Retry-After`) halves it (floor 1)
//! and pauses new requests of the shop until the `Retry-After` time; every
//! [`INCREASE_AFTER`] successful requests since the last change add one
//! (up to the ceiling). Several requests in flight when the shop pushes
//! back all answer "slow down": only the first of them halves the limit
//! (the others started before it was lowered, so they say nothing new).
//!
//! Use: `let permit = limiter.acquire().await;` before each request, then
//! `permit.success()` or `permit.backpressure(retry_after)`; dropping the
//! permit without either is neutral (a timeout, a bad answer). Never hold
//! a permit while waiting for another (a worker that holds one and calls
//! [`super::RunCtx::request`], which acquires its own, can deadlock at
//! limit 1). `RunCtx::request` does all of this per attempt, so a walk that
//! issues its requests through it is limited without more code.
//!
//! Writes to the shop (write-back, when it comes) take
//! [`ShopLimiter::acquire_write`]: one write at a time per shop, whatever
//! the limit, and each write also holds an ordinary permit, so writes and
//! reads together stay within the limit.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Successful requests since the last change after which the limit grows
/// by one.
pub const INCREASE_AFTER: u32 = 16;
/// Longest pause a `Retry-After` imposes on the shop's other requests (the
/// request that got it waits as long as its own retry policy says).
const MAX_PAUSE: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct State {
    /// The ceiling (`sync.shop_concurrency`).
    max: usize,
    /// Requests allowed in flight now: 1 ..= max.
    limit: usize,
    in_flight: usize,
    /// Successes since the limit last changed.
    successes: u32,
    /// Bumped on every decrease: a permit taken before it does not lower
    /// the limit again.
    epoch: u64,
    /// No new request before this instant (a `Retry-After`).
    paused_until: Option<Instant>,
    /// Backpressure answers seen, for the metrics.
    backpressure_total: u64,
    /// Decreases made, for the metrics.
    decreases_total: u64,
}

/// A snapshot for status and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct LimiterStatus {
    /// Requests allowed in flight now.
    pub limit: usize,
    /// The configured ceiling.
    pub max: usize,
    pub in_flight: usize,
    /// Answers that asked to slow down (429, 503, `Retry-After`).
    pub backpressure_total: u64,
    /// Times the limit was halved.
    pub decreases_total: u64,
}

/// One shop's limiter. Cheap to clone (an `Arc` inside).
#[derive(Debug, Clone)]
pub struct ShopLimiter {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: Mutex<State>,
    released: Notify,
    writes: Arc<tokio::sync::Mutex<()>>,
}

impl ShopLimiter {
    /// A limiter allowing up to `max` requests in flight (at least 1).
    pub fn new(max: usize) -> ShopLimiter {
        let max = max.max(1);
        ShopLimiter {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    max,
                    limit: max,
                    in_flight: 0,
                    successes: 0,
                    epoch: 0,
                    paused_until: None,
                    backpressure_total: 0,
                    decreases_total: 0,
                }),
                released: Notify::new(),
                writes: Arc::new(tokio::sync::Mutex::new(())),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies a new ceiling (a reload changed `sync.shop_concurrency`).
    /// The limit keeps what it learned, within the new ceiling.
    pub fn set_max(&self, max: usize) {
        let max = max.max(1);
        let mut s = self.state();
        if s.max == max {
            return;
        }
        s.max = max;
        s.limit = s.limit.min(max);
        drop(s);
        self.inner.released.notify_waiters();
    }

    /// Requests allowed in flight now: how many workers are worth running.
    pub fn limit(&self) -> usize {
        self.state().limit
    }

    pub fn status(&self) -> LimiterStatus {
        let s = self.state();
        LimiterStatus {
            limit: s.limit,
            max: s.max,
            in_flight: s.in_flight,
            backpressure_total: s.backpressure_total,
            decreases_total: s.decreases_total,
        }
    }

    /// Waits until a request may start (fewer than `limit` in flight and
    /// no `Retry-After` pause), then counts it in flight until the permit
    /// is dropped.
    pub async fn acquire(&self) -> Permit {
        loop {
            let released = self.inner.released.notified();
            tokio::pin!(released);
            // Registered before the state is read: a release in between is
            // not missed.
            released.as_mut().enable();
            let pause = {
                let mut s = self.state();
                let now = Instant::now();
                match s.paused_until {
                    Some(t) if t > now => Some(t),
                    _ => {
                        s.paused_until = None;
                        if s.in_flight < s.limit {
                            s.in_flight += 1;
                            return Permit {
                                limiter: self.clone(),
                                epoch: s.epoch,
                                done: false,
                            };
                        }
                        None
                    }
                }
            };
            match pause {
                Some(until) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(until.into()) => {}
                        _ = released => {}
                    }
                }
                None => released.await,
            }
        }
    }

    /// The permit for a write to the shop: waits for any other write of
    /// this shop to finish, then for an ordinary permit.
    pub async fn acquire_write(&self) -> WritePermit {
        let exclusive = self.inner.writes.clone().lock_owned().await;
        let permit = self.acquire().await;
        WritePermit {
            permit,
            _exclusive: exclusive,
        }
    }

    fn release(&self, epoch: u64, outcome: Option<Option<Duration>>) {
        let mut s = self.state();
        s.in_flight = s.in_flight.saturating_sub(1);
        match outcome {
            None => {}
            Some(None) => {
                s.successes = s.successes.saturating_add(1);
                if s.successes >= INCREASE_AFTER && s.limit < s.max {
                    s.limit += 1;
                    s.successes = 0;
                }
            }
            Some(Some(retry_after)) => {
                s.backpressure_total += 1;
                s.successes = 0;
                if epoch == s.epoch {
                    s.limit = (s.limit / 2).max(1);
                    s.epoch += 1;
                    s.decreases_total += 1;
                }
                if !retry_after.is_zero() {
                    let until = Instant::now() + retry_after.min(MAX_PAUSE);
                    if s.paused_until.is_none_or(|t| t < until) {
                        s.paused_until = Some(until);
                    }
                }
            }
        }
        drop(s);
        self.inner.released.notify_waiters();
    }
}

/// Whether a shop's answer asks cobbyd to slow down: 429, 503 (also the
/// maintenance page) or a `Retry-After`.
pub fn is_backpressure(e: &crate::magento::ShopError) -> bool {
    use crate::magento::FailureKind;
    e.retry_after.is_some()
        || matches!(e.kind, FailureKind::RateLimited | FailureKind::Maintenance)
        || matches!(e.status, Some(429 | 503))
}

/// One request in flight. Report how it went with [`Permit::success`] or
/// [`Permit::backpressure`]; dropping it says nothing either way.
#[derive(Debug)]
#[must_use = "a permit counts a request in flight until it is dropped"]
pub struct Permit {
    limiter: ShopLimiter,
    epoch: u64,
    done: bool,
}

impl Permit {
    /// The shop answered: counts towards the next increase.
    pub fn success(mut self) {
        self.done = true;
        self.limiter.release(self.epoch, Some(None));
    }

    /// The shop asked to slow down: halves the limit (once per episode)
    /// and, with a `Retry-After`, pauses the shop's new requests until then
    /// (at most a minute).
    pub fn backpressure(mut self, retry_after: Option<Duration>) {
        self.done = true;
        self.limiter.release(
            self.epoch,
            Some(Some(retry_after.unwrap_or(Duration::ZERO))),
        );
    }

    /// Reports a shop error: backpressure when [`is_backpressure`] says so,
    /// neutral otherwise.
    pub fn failed(self, e: &crate::magento::ShopError) {
        if is_backpressure(e) {
            self.backpressure(e.retry_after);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.done {
            self.limiter.release(self.epoch, None);
        }
    }
}

/// A write to the shop in progress (see [`ShopLimiter::acquire_write`]).
#[derive(Debug)]
pub struct WritePermit {
    pub permit: Permit,
    _exclusive: tokio::sync::OwnedMutexGuard<()>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::magento::{FailureKind, ShopError};

    #[tokio::test]
    async fn caps_requests_in_flight() {
        let l = ShopLimiter::new(3);
        let a = l.acquire().await;
        let b = l.acquire().await;
        let c = l.acquire().await;
        assert_eq!(l.status().in_flight, 3);
        // A fourth waits until one is released.
        let l2 = l.clone();
        let waiter = tokio::spawn(async move { l2.acquire().await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(a);
        let d = waiter.await.unwrap();
        assert_eq!(l.status().in_flight, 3);
        drop((b, c, d));
        assert_eq!(l.status().in_flight, 0);
    }

    #[tokio::test]
    async fn halves_on_backpressure_once_per_episode_with_floor_one() {
        let l = ShopLimiter::new(8);
        let permits: Vec<Permit> =
            futures_util::future::join_all((0..8).map(|_| l.acquire())).await;
        // All eight in flight get a 429: one halving, not three.
        for p in permits {
            p.backpressure(None);
        }
        assert_eq!(l.limit(), 4);
        assert_eq!(l.status().backpressure_total, 8);
        assert_eq!(l.status().decreases_total, 1);
        // Each new episode halves again, down to 1 and no further.
        for want in [2, 1, 1] {
            l.acquire().await.backpressure(None);
            assert_eq!(l.limit(), want);
        }
    }

    #[tokio::test]
    async fn grows_by_one_after_enough_successes_up_to_the_ceiling() {
        let l = ShopLimiter::new(3);
        l.acquire().await.backpressure(None);
        assert_eq!(l.limit(), 1);
        for _ in 0..INCREASE_AFTER - 1 {
            l.acquire().await.success();
        }
        assert_eq!(l.limit(), 1);
        l.acquire().await.success();
        assert_eq!(l.limit(), 2);
        for _ in 0..INCREASE_AFTER * 5 {
            l.acquire().await.success();
        }
        assert_eq!(l.limit(), 3, "never past the ceiling");
    }

    #[tokio::test]
    async fn a_dropped_permit_is_neutral() {
        let l = ShopLimiter::new(2);
        for _ in 0..INCREASE_AFTER * 2 {
            drop(l.acquire().await);
        }
        l.acquire().await.backpressure(None);
        assert_eq!(l.limit(), 1);
        for _ in 0..INCREASE_AFTER * 2 {
            drop(l.acquire().await);
        }
        assert_eq!(l.limit(), 1, "drops do not count as successes");
    }

    #[tokio::test]
    async fn retry_after_pauses_new_requests() {
        let l = ShopLimiter::new(4);
        l.acquire()
            .await
            .backpressure(Some(Duration::from_secs(3600)));
        // Paused for (at most) a minute: a new request does not start now.
        let l2 = l.clone();
        let waiter = tokio::spawn(async move { l2.acquire().await });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        waiter.abort();
        // A short pause ends by itself; never before its time.
        let l = ShopLimiter::new(4);
        let started = Instant::now();
        l.acquire()
            .await
            .backpressure(Some(Duration::from_millis(50)));
        let _p = l.acquire().await;
        assert!(started.elapsed() >= Duration::from_millis(50));
    }

    #[tokio::test]
    async fn set_max_lowers_and_raises_the_ceiling() {
        let l = ShopLimiter::new(4);
        l.set_max(2);
        assert_eq!(
            l.status(),
            LimiterStatus {
                limit: 2,
                max: 2,
                in_flight: 0,
                backpressure_total: 0,
                decreases_total: 0
            }
        );
        l.set_max(6);
        assert_eq!(l.limit(), 2, "grows back by successes, not at once");
        assert_eq!(l.status().max, 6);
    }

    #[tokio::test]
    async fn writes_are_one_at_a_time() {
        let l = ShopLimiter::new(4);
        let w = l.acquire_write().await;
        let l2 = l.clone();
        let second = tokio::spawn(async move { l2.acquire_write().await });
        tokio::task::yield_now().await;
        assert!(!second.is_finished());
        // Reads still proceed next to the write.
        let _r = l.acquire().await;
        drop(w);
        let w2 = second.await.unwrap();
        w2.permit.success();
    }

    #[test]
    fn backpressure_answers() {
        let e = |k| ShopError::new(k, "x");
        assert!(is_backpressure(&e(FailureKind::RateLimited)));
        assert!(is_backpressure(&e(FailureKind::Maintenance)));
        assert!(is_backpressure(
            &e(FailureKind::ServerError).with_status(503)
        ));
        assert!(is_backpressure(
            &e(FailureKind::ServerError).with_retry_after(Some(Duration::from_secs(1)))
        ));
        assert!(!is_backpressure(
            &e(FailureKind::ServerError).with_status(500)
        ));
        assert!(!is_backpressure(&e(FailureKind::Timeout)));
    }
}
