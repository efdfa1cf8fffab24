//! Background delivery of spooled messages, and the per-mailbox message pacing.
//!
//! Each account has up to `max_sessions_per_mailbox` workers taking the oldest due message,
//! held to `messages_per_minute`. Every attempt forwards only the recipients not yet
//! delivered or refused; 4xx, timeouts and connection failures retry with exponential
//! backoff and jitter; permanent refusals and `max_age` move the message to `dead/` (and,
//! with `queue.bounce`, spool a delivery status notification to the sender). Every
//! outcome is a relay log line. A message goes from its spool file to the upstream in
//! pieces, never read whole. Storage is `spool`'s job; upstream sessions are the pool's.
//!
//! Queue control (`queue` commands while `serve` runs): an attempt holds the message's file
//! lock from start to end and skips a message whose lock is taken; a control scan every
//! [`CONTROL_SCAN`] takes up retry markers, adopts message files requeued from `dead/` and
//! forgets those deleted.

use crate::clock::unix_now;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::relay::dsn;
use crate::relay::envelope::{Address, MailParams, ReversePath};
use crate::relay::outcome;
use crate::relay::pool::BeginError;
use crate::relay::spool::{
    Envelope, Locked, Progress, Spool, SpoolError, SpoolSink, SPOOL_VERSION,
};
use crate::relay::transport::{Transaction, Transport};
use crate::relay::upstream::{UpReply, UpstreamError};
use crate::sync::lock;
use crate::telemetry::{Outcome, RelayEvent};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io::{BufReader, Read};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How much of a spooled message is read and sent at once.
const BODY_CHUNK: usize = 64 * 1024;
/// Each account's mailbox (a delivery status notification's `From:`).
fn mailboxes_of(config: &Config) -> HashMap<String, String> {
    config
        .accounts
        .iter()
        .map(|a| (a.username.clone(), a.mailbox.clone()))
        .collect()
}

/// The window over which `messages_per_minute` is counted.
const PACING_WINDOW: Duration = Duration::from_secs(60);
/// How often the spool directory is read for `queue` commands' requests (retry markers,
/// requeued and deleted messages): the delay an operator waits, for one directory listing.
const CONTROL_SCAN: Duration = Duration::from_secs(1);
/// When a `queue` command holds a message's lock, the attempt is tried again this much later.
const LOCK_BUSY_RETRY: Duration = Duration::from_secs(1);

/// Sends per mailbox in the last minute (sliding window).
#[derive(Debug, Default)]
pub struct Pacer {
    sent: Mutex<VecDeque<Instant>>,
}

impl Pacer {
    /// The sends of the last minute (older ones dropped).
    fn window(&self, now: Instant) -> MutexGuard<'_, VecDeque<Instant>> {
        let mut q = lock(&self.sent);
        while q
            .front()
            .is_some_and(|t| now.duration_since(*t) >= PACING_WINDOW)
        {
            q.pop_front();
        }
        q
    }

    /// Records a send now and returns how many fell in the last minute (including it).
    pub(crate) fn note(&self) -> usize {
        let now = Instant::now();
        let mut q = self.window(now);
        q.push_back(now);
        q.len()
    }

    /// How long to wait before another send keeps within `limit` per minute.
    pub fn wait(&self, limit: u32) -> Duration {
        if limit == 0 {
            return Duration::ZERO;
        }
        let now = Instant::now();
        let q = self.window(now);
        if q.len() < limit as usize {
            return Duration::ZERO;
        }
        q.front()
            .map(|t| (*t + PACING_WINDOW).saturating_duration_since(now))
            .unwrap_or_default()
    }
}

struct Item {
    env: Envelope,
    progress: Progress,
    next_attempt: Instant,
    in_flight: bool,
    /// The message file's size, counted against `queue.max_bytes`.
    file_len: u64,
}

struct AccountQueue {
    items: Mutex<BTreeMap<(u64, String), Item>>,
    wake: Notify,
}

/// The spool plus its delivery workers.
pub struct Queue {
    spool: Spool,
    transport: Transport,
    cfg: crate::config::Queue,
    per_minute: std::sync::atomic::AtomicU32,
    accounts: AccountQueues,
    pacers: Arc<Pacers>,
    metrics: Arc<Metrics>,
    workers: TaskTracker,
    reload: Mutex<Reload>,
    /// Each account's mailbox (a delivery status notification's `From:`).
    /// Follows reloads.
    mailboxes: Mutex<HashMap<String, String>>,
    /// Our host name (a delivery status notification's `Reporting-MTA`).
    hostname: String,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("spool", &self.spool)
            .finish_non_exhaustive()
    }
}

impl Queue {
    /// Opens the spool, resumes what it holds, and starts the workers.
    pub fn start(
        config: &Config,
        q: &crate::config::Queue,
        transport: Transport,
        pacers: Arc<Pacers>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> std::io::Result<Arc<Queue>> {
        let spool = Spool::open(&config.state.dir, q.max_bytes)?;
        let accounts: HashMap<String, AccountQueue> = config
            .accounts
            .iter()
            .map(|a| {
                (
                    a.username.clone(),
                    AccountQueue {
                        items: Mutex::new(BTreeMap::new()),
                        wake: Notify::new(),
                    },
                )
            })
            .collect();
        let resumed = spool.scan()?;
        let now = Instant::now();
        let mut orphans = Vec::new();
        for (env, progress) in resumed {
            match accounts.get(&env.account) {
                Some(aq) => {
                    let file_len = spool.file_len(&env.id);
                    lock(&aq.items).insert(
                        (env.received_at, env.id.clone()),
                        Item {
                            env,
                            progress,
                            next_attempt: now,
                            in_flight: false,
                            file_len,
                        },
                    );
                }
                None => orphans.push(env),
            }
        }
        for env in orphans {
            let reason = format!("account {} is no longer configured", env.account);
            tracing::error!(id = %env.id, %reason, "spooled message cannot be delivered; moved to dead at start (a reload keeps them instead, for the account to come back)");
            let _ = spool.bury(&env.id, &reason);
        }
        let depth: usize = accounts.values().map(|a| lock(&a.items).len()).sum();
        if depth > 0 {
            tracing::info!(messages = depth, "resuming spooled messages");
        }
        let queue = Arc::new(Queue {
            spool,
            transport,
            cfg: q.clone(),
            per_minute: config.upstream.messages_per_minute.into(),
            accounts: AccountQueues::new(accounts),
            pacers,
            metrics,
            workers: TaskTracker::new(),
            reload: Mutex::new(Reload::new(&shutdown)),
            mailboxes: Mutex::new(mailboxes_of(config)),
            hostname: crate::relay::upstream::local_hostname(),
        });
        for a in &config.accounts {
            for _ in 0..config.upstream.max_sessions_per_mailbox {
                let q = queue.clone();
                let name = a.username.clone();
                let shutdown = queue.worker_token(&name);
                queue
                    .workers
                    .spawn(async move { q.work(&name, shutdown).await });
            }
        }
        {
            let q = queue.clone();
            queue
                .workers
                .spawn(async move { q.control(shutdown).await });
        }
        queue.workers.close();
        Ok(queue)
    }

    /// Waits for the workers to finish the deliveries they are in (after shutdown).
    pub(crate) async fn stopped(&self) {
        self.workers.wait().await;
    }

    /// Messages waiting, and the age of the oldest (for metrics and readiness).
    pub fn depth(&self) -> (usize, Option<Duration>) {
        let now = unix_now();
        let mut n = 0;
        let mut oldest: Option<u64> = None;
        for aq in self.accounts.values() {
            let items = lock(&aq.items);
            n += items.len();
            if let Some(((t, _), _)) = items.iter().next() {
                oldest = Some(oldest.map_or(*t, |o| o.min(*t)));
            }
        }
        (
            n,
            oldest.map(|t| Duration::from_secs(now.saturating_sub(t))),
        )
    }

    /// Whether a message of `size` bytes (0: unknown) may still fit in the spool
    /// (`queue.max_bytes`).
    pub(crate) fn has_room(&self, size: usize) -> bool {
        self.spool.has_room(size)
    }

    /// Starts storing a message for `env.account`; the content streams in through the
    /// sink, then [`Queue::commit`]. The disk work runs off the async worker threads.
    pub(crate) fn create(&self, env: &Envelope) -> Result<SpoolSink, SpoolError> {
        if !self.accounts.contains_key(&env.account) {
            return Err(SpoolError::UnknownAccount(env.account.clone()));
        }
        Ok(self.spool.sink(env))
    }

    /// Stores the written message durably and queues it; its size. Only Ok means the
    /// client may hear 250.
    pub(crate) async fn commit(
        &self,
        w: SpoolSink,
        mut env: Envelope,
    ) -> Result<usize, SpoolError> {
        let Some(aq) = self.accounts.get(&env.account) else {
            return Err(SpoolError::UnknownAccount(env.account.clone()));
        };
        let aq = &*aq;
        env.bytes = usize::try_from(w.commit().await?).unwrap_or(usize::MAX);
        let bytes = env.bytes;
        self.enqueue(aq, env, Progress::default(), false);
        Ok(bytes)
    }

    /// Stores a whole message durably and queues it. Only Ok means the client may hear 250.
    #[cfg(test)]
    pub(crate) async fn accept(&self, env: Envelope, body: &[u8]) -> Result<(), SpoolError> {
        let mut w = self.create(&env)?;
        w.write(body).await?;
        self.commit(w, env).await?;
        Ok(())
    }

    /// The spool (tests: its fsync hook).
    #[cfg(test)]
    pub(crate) fn spool(&self) -> &Spool {
        &self.spool
    }

    /// Queues a message whose file is in the spool, due now. `adopted`: its bytes were not
    /// counted yet (found by the control scan); otherwise the writer counted them. A message
    /// already queued stays as it is (the control scan may have found a new file before
    /// its writer queued it): never two entries, never an entry replaced mid-attempt.
    fn enqueue(&self, aq: &AccountQueue, env: Envelope, progress: Progress, adopted: bool) {
        let file_len = self.spool.file_len(&env.id);
        let mut items = lock(&aq.items);
        match items.entry((env.received_at, env.id.clone())) {
            std::collections::btree_map::Entry::Occupied(_) => {
                if !adopted {
                    // The control scan adopted it first and counted it: once is enough.
                    self.spool.disown(file_len);
                }
                return;
            }
            std::collections::btree_map::Entry::Vacant(v) => {
                if adopted {
                    self.spool.adopt(file_len);
                }
                v.insert(Item {
                    env,
                    progress,
                    next_attempt: Instant::now(),
                    in_flight: false,
                    file_len,
                });
            }
        }
        drop(items);
        aq.wake.notify_one();
    }

    /// The oldest due message not being delivered, marked in flight; or when to look again.
    fn take_due(&self, aq: &AccountQueue) -> Result<(Envelope, Progress), Option<Instant>> {
        let now = Instant::now();
        let mut items = lock(&aq.items);
        let mut earliest: Option<Instant> = None;
        for item in items.values_mut() {
            if item.in_flight {
                continue;
            }
            if item.next_attempt <= now {
                item.in_flight = true;
                return Ok((item.env.clone(), item.progress.clone()));
            }
            earliest = Some(earliest.map_or(item.next_attempt, |e| e.min(item.next_attempt)));
        }
        Err(earliest)
    }

    async fn work(self: Arc<Self>, account: &str, shutdown: CancellationToken) {
        let Some(aq) = self.accounts.get(account) else {
            return;
        };
        let aq = &*aq;
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            let (env, progress) = match self.take_due(aq) {
                Ok(x) => x,
                Err(earliest) => {
                    let sleep = earliest.map_or(Duration::from_secs(3600), |t| {
                        t.saturating_duration_since(Instant::now())
                    });
                    tokio::select! {
                        _ = aq.wake.notified() => {}
                        _ = tokio::time::sleep(sleep) => {}
                        _ = shutdown.cancelled() => return,
                    }
                    continue;
                }
            };
            let pace = self.pacers.get(account).map_or(Duration::ZERO, |p| {
                p.wait(self.per_minute.load(std::sync::atomic::Ordering::Relaxed))
            });
            if !pace.is_zero() {
                tracing::debug!(
                    account,
                    wait_ms = pace.as_millis() as u64,
                    "holding spooled message: messages_per_minute reached"
                );
                tokio::select! {
                    _ = tokio::time::sleep(pace) => {}
                    _ = shutdown.cancelled() => {
                        self.release(aq, &env, progress, Instant::now());
                        return;
                    }
                }
            }
            if let Some(p) = self.pacers.get(account) {
                p.note();
            }
            self.attempt(aq, env, progress).await;
            // Let a waiting sibling take the next one.
            aq.wake.notify_one();
        }
    }

    fn release(&self, aq: &AccountQueue, env: &Envelope, progress: Progress, next: Instant) {
        if let Some(item) = lock(&aq.items).get_mut(&(env.received_at, env.id.clone())) {
            item.in_flight = false;
            item.progress = progress;
            item.next_attempt = next;
        }
    }

    /// A message already reported (delivered, or dead) whose removal from the spool failed
    /// before: remove it (or move it to dead/) now, without sending or logging it again.
    async fn clean_up(&self, aq: &AccountQueue, env: &Envelope, progress: &Progress) {
        let done = if progress.failed.is_empty() {
            self.spool.remove_async(&env.id).await
        } else {
            let reason = progress
                .failed
                .iter()
                .map(|(r, why)| format!("{r}: {why}"))
                .collect::<Vec<_>>()
                .join("\n");
            self.spool.bury_async(&env.id, &reason).await
        };
        match done {
            Ok(()) => self.forget(aq, env),
            Err(e) => {
                tracing::error!(id = %env.id, error = %e, "cannot clean up a finished message; trying again later");
                let next = Instant::now() + self.cfg.retry_max;
                self.release(aq, env, progress.clone(), next);
            }
        }
    }

    fn forget(&self, aq: &AccountQueue, env: &Envelope) {
        lock(&aq.items).remove(&(env.received_at, env.id.clone()));
    }

    /// The message file left the spool without us (`queue delete`).
    fn vanished(&self, aq: &AccountQueue, env: &Envelope) {
        if let Some(item) = lock(&aq.items).remove(&(env.received_at, env.id.clone())) {
            self.spool.disown(item.file_len);
            tracing::info!(id = %env.id, "message removed from the spool by a queue command");
        }
    }

    fn log(&self, env: &Envelope, started: Instant, outcome: Outcome, code: u16, reply: &str) {
        self.metrics.record(&RelayEvent {
            id: &env.id,
            account: &env.account,
            from: &env.from,
            rcpts: &env.rcpts,
            bytes: env.bytes,
            outcome,
            upstream_code: code,
            upstream_reply: reply,
            ms: started.elapsed().as_millis() as u64,
            via: None,
        });
    }

    /// One delivery attempt of one message.
    async fn attempt(&self, aq: &AccountQueue, env: Envelope, mut progress: Progress) {
        let started = Instant::now();
        // Held until the attempt is over: a `queue` command waits for it, and this attempt
        // does not start while a command holds it.
        let _lock = match self.spool.try_lock(&env.id) {
            Ok(Locked::Held(l)) => l,
            Ok(Locked::Busy) => {
                tracing::debug!(id = %env.id, "message locked by a queue command; trying again shortly");
                return self.release(aq, &env, progress, Instant::now() + LOCK_BUSY_RETRY);
            }
            Ok(Locked::Gone) => return self.vanished(aq, &env),
            Err(e) => {
                tracing::error!(id = %env.id, error = %e, "cannot lock the spooled message; trying again later");
                let next = Instant::now() + self.cfg.retry_min;
                return self.release(aq, &env, progress, next);
            }
        };
        if progress.pending(&env).next().is_none() {
            // Reported in an earlier attempt whose clean-up failed: only the clean-up is left.
            return self.clean_up(aq, &env, &progress).await;
        }
        let age = Duration::from_secs(unix_now().saturating_sub(progress.age_from(&env)));
        if age >= self.cfg.max_age {
            let reason = format!(
                "not delivered within queue.max_age_secs ({} s); last error: {}",
                self.cfg.max_age.as_secs(),
                progress.last_error.as_deref().unwrap_or("none")
            );
            return self
                .finish_dead(aq, &env, &progress, started, 0, &reason)
                .await;
        }
        let body = match self.spool.open_body(&env.id) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(id = %env.id, error = %e, "cannot read spooled message");
                return self
                    .finish_dead(
                        aq,
                        &env,
                        &progress,
                        started,
                        0,
                        &format!("spool file unreadable: {e}"),
                    )
                    .await;
            }
        };
        let (from, params) = match (
            ReversePath::parse_stored(&env.from),
            MailParams::parse_stored(&env.params),
        ) {
            (Ok(f), Ok(p)) => (f, p),
            (Err(e), _) | (_, Err(e)) => {
                let reason = format!("invalid envelope in the spool: {e}");
                return self
                    .finish_dead(aq, &env, &progress, started, 0, &reason)
                    .await;
            }
        };
        progress.attempts += 1;
        let mut retry_after = None;
        let (code, text, transient) = self
            .try_send(
                &env,
                &mut progress,
                (&from, &params),
                body,
                &mut retry_after,
            )
            .await;
        progress.record(unix_now(), code, &text);
        if progress.pending(&env).next().is_none() {
            if progress.failed.is_empty() {
                self.log(&env, started, Outcome::Delivered, code, &text);
                match self.spool.remove_async(&env.id).await {
                    Ok(()) => self.forget(aq, &env),
                    Err(e) => {
                        // Kept (and known) so that it is neither re-adopted nor re-sent: its
                        // progress says delivered; the removal is tried again later.
                        tracing::error!(id = %env.id, error = %e, "delivered, but cannot remove the spool file; trying again later");
                        let next = Instant::now() + self.cfg.retry_max;
                        self.release(aq, &env, progress, next);
                    }
                }
            } else {
                let reason = progress
                    .failed
                    .iter()
                    .map(|(r, why)| format!("{r}: {why}"))
                    .collect::<Vec<_>>()
                    .join("\n");
                self.finish_dead(aq, &env, &progress, started, code, &reason)
                    .await;
            }
            return;
        }
        // Something is left to try later.
        progress.last_error = Some(format!("{code} {text}"));
        let delay = if transient {
            self.backoff(progress.attempts)
        } else {
            self.cfg.retry_min
        };
        // The upstream said when to come back (Graph's Retry-After): not before.
        let delay = delay.max(retry_after.unwrap_or_default());
        progress.next_attempt = Some(unix_now().saturating_add(delay.as_secs()));
        if let Err(e) = self.spool.save_progress_async(&env.id, &progress).await {
            tracing::error!(id = %env.id, error = %e, "cannot record delivery progress");
        }
        tracing::info!(id = %env.id, attempts = progress.attempts, retry_in_secs = delay.as_secs_f32(), "delivery deferred");
        self.log(&env, started, Outcome::Deferred, code, &text);
        self.release(aq, &env, progress, Instant::now() + delay);
    }

    /// The message will not be delivered: to `dead/` with its progress (a delivery status
    /// notification of ours is dropped instead), and with `queue.bounce` a report to its
    /// sender.
    async fn finish_dead(
        &self,
        aq: &AccountQueue,
        env: &Envelope,
        progress: &Progress,
        started: Instant,
        code: u16,
        reason: &str,
    ) {
        let mut progress = progress.clone();
        progress.next_attempt = None;
        let report = self.cfg.bounce && !env.from.is_empty() && !progress.dsn;
        let headers = if report {
            self.spool.headers(&env.id, false).ok()
        } else {
            None
        };
        if progress.dsn {
            tracing::warn!(id = %env.id, %reason, "delivery status notification not delivered; dropped");
            if let Err(e) = self.spool.remove_async(&env.id).await {
                tracing::error!(id = %env.id, error = %e, "cannot remove the spool file");
            }
        } else {
            if let Err(e) = self.spool.save_progress_async(&env.id, &progress).await {
                tracing::error!(id = %env.id, error = %e, "cannot record delivery progress");
            }
            if let Err(e) = self.spool.bury_async(&env.id, reason).await {
                tracing::error!(id = %env.id, error = %e, "cannot move the message to dead; trying again later");
                let next = Instant::now() + self.cfg.retry_max;
                self.release(aq, env, progress.clone(), next);
                self.log(env, started, Outcome::Dead, code, reason);
                return;
            }
        }
        self.forget(aq, env);
        self.log(env, started, Outcome::Dead, code, reason);
        if let Some(headers) = headers {
            let mut failures: Vec<dsn::Failure> = progress
                .failed
                .iter()
                .map(|(r, why)| dsn::Failure {
                    recipient: r.clone(),
                    reason: why.clone(),
                })
                .collect();
            failures.extend(progress.pending(env).map(|r| dsn::Failure {
                recipient: r.clone(),
                reason: reason.to_string(),
            }));
            self.bounce(aq, env, &failures, &headers).await;
        }
    }

    /// Spools a delivery status notification (RFC 3464) about `env` to its sender, from
    /// `<>`, through the same account; delivered like any spooled message (a relay log line
    /// of its own, under a new id). Its progress is written before its message file, so the
    /// control scan never takes it for an ordinary message.
    async fn bounce(
        &self,
        aq: &AccountQueue,
        env: &Envelope,
        failures: &[dsn::Failure],
        headers: &[u8],
    ) {
        let started = Instant::now();
        let Ok(to) = Address::parse(&env.from, true) else {
            tracing::warn!(id = %env.id, "no delivery status notification: the sender is not an address");
            return;
        };
        let mailbox = lock(&self.mailboxes)
            .get(&env.account)
            .cloned()
            .unwrap_or_default();
        let mut original = headers.to_vec();
        original.extend_from_slice(b"\r\n");
        let now = unix_now();
        let content = dsn::build(&dsn::Report {
            reporting_mta: &self.hostname,
            from_mailbox: &mailbox,
            to: &to,
            id: &env.id,
            arrival: env.received_at,
            now,
            failures,
            original: &original,
        });
        let mut params = Vec::new();
        if !content.is_ascii() {
            params.push("BODY=8BITMIME");
        }
        if !env.from.is_ascii() {
            params.push("SMTPUTF8");
        }
        let report = Envelope {
            version: SPOOL_VERSION,
            id: crate::telemetry::new_message_id(),
            account: env.account.clone(),
            from: String::new(),
            params: params.join(" "),
            rcpts: vec![env.from.clone()],
            received_at: now,
            bytes: content.len(),
        };
        let progress = Progress {
            dsn: true,
            ..Progress::default()
        };
        let stored = {
            let (report, progress) = (report.clone(), progress.clone());
            self.spool
                .off_thread(move |s| {
                    let stored = s
                        .save_progress(&report.id, &progress)
                        .map_err(SpoolError::from)
                        .and_then(|()| s.store(&report, &content));
                    if stored.is_err() {
                        let _ = s.remove_progress(&report.id);
                    }
                    stored
                })
                .await
        };
        if let Err(e) = stored {
            tracing::error!(id = %env.id, report = %report.id, error = %e, "cannot spool the delivery status notification; not sent");
            return;
        }
        tracing::info!(id = %env.id, report = %report.id, to = %env.from, "delivery status notification spooled");
        self.log(&report, started, Outcome::Spooled, 0, "");
        self.enqueue(aq, report, progress, false);
    }

    /// Every [`CONTROL_SCAN`], until shutdown: takes up what `queue` commands left.
    async fn control(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(CONTROL_SCAN);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            // Listing the directory, and moving an unreadable message to dead/, touch the disk.
            let q = self.clone();
            if let Err(e) = self.spool.off_thread(move |_| q.control_scan()).await {
                tracing::warn!(error = %e, "cannot read the spool directory for queue commands");
            }
        }
    }

    /// One look at the spool directory: retry markers make their message due now; message
    /// files we do not know (requeued from `dead/`) are queued; messages whose file is gone
    /// (`queue delete`) are forgotten. Messages in flight are left to their attempt.
    fn control_scan(&self) -> std::io::Result<()> {
        let (msgs, retries) = self.spool.ids()?;
        let on_disk: HashSet<&str> = msgs.iter().map(String::as_str).collect();
        let retry: HashSet<&str> = retries.iter().map(String::as_str).collect();
        let now = Instant::now();
        let mut known: HashSet<String> = HashSet::new();
        // A removed account's messages wait in its dormant queue: known, not orphans.
        for aq in lock(&self.reload).dormant.values() {
            known.extend(lock(&aq.items).values().map(|i| i.env.id.clone()));
        }
        for aq in self.accounts.values() {
            let mut due = false;
            let mut items = lock(&aq.items);
            let mut gone = Vec::new();
            for (key, item) in items.iter_mut() {
                known.insert(item.env.id.clone());
                if item.in_flight {
                    continue;
                }
                // Queued after the listing was read: still there.
                if !on_disk.contains(item.env.id.as_str())
                    && !self.spool.msg_path(&item.env.id).exists()
                {
                    gone.push(key.clone());
                } else if retry.contains(item.env.id.as_str()) {
                    item.next_attempt = now;
                    due = true;
                }
            }
            for key in gone {
                if let Some(item) = items.remove(&key) {
                    self.spool.disown(item.file_len);
                    tracing::info!(id = %item.env.id, "message removed from the spool by a queue command");
                }
            }
            drop(items);
            if due {
                aq.wake.notify_one();
            }
        }
        for id in &msgs {
            // A file a session (or a report) has just written is queued by its writer;
            // requeued ones keep the time they were written at.
            if known.contains(id) || self.spool.is_fresh(id, 2 * CONTROL_SCAN) {
                continue;
            }
            let Some((env, progress)) = self.spool.load(&self.spool.msg_path(id)) else {
                continue;
            };
            match self.accounts.get(&env.account) {
                Some(aq) => {
                    tracing::info!(id = %env.id, "message queued by a queue command");
                    self.enqueue(&aq, env, progress, true);
                }
                None => {
                    // SPEC: a removed account's spooled messages stay, and are delivered if
                    // it comes back (a reload moves its dormant queue back into service).
                    tracing::warn!(id = %env.id, account = %env.account, "spooled message of an account that is not configured; kept until it is");
                    let aq = lock(&self.reload)
                        .dormant
                        .entry(env.account.clone())
                        .or_insert_with(|| {
                            Arc::new(AccountQueue {
                                items: Mutex::new(BTreeMap::new()),
                                wake: Notify::new(),
                            })
                        })
                        .clone();
                    self.enqueue(&aq, env, progress, true);
                }
            }
        }
        for id in &retries {
            self.spool.clear_retry(id);
        }
        Ok(())
    }

    /// Exponential backoff from retry_min to retry_max, with up to 25 % jitter.
    fn backoff(&self, attempts: u32) -> Duration {
        let base = self
            .cfg
            .retry_min
            .saturating_mul(1u32 << attempts.saturating_sub(1).min(16))
            .min(self.cfg.retry_max);
        let mut r = [0u8; 2];
        let _ = getrandom::getrandom(&mut r);
        let jitter = base.mul_f64(f64::from(u16::from_le_bytes(r)) / f64::from(u16::MAX) / 4.0);
        (base + jitter).min(self.cfg.retry_max)
    }

    /// Sends to the pending recipients. Returns the last upstream code and text, and whether
    /// what is left failed transiently; `retry_after` gets the upstream's wish, if any.
    async fn try_send(
        &self,
        env: &Envelope,
        progress: &mut Progress,
        (from, params): (&ReversePath, &MailParams),
        (mut body, len): (BufReader<File>, u64),
        retry_after: &mut Option<Duration>,
    ) -> (u16, String, bool) {
        let size = usize::try_from(len).unwrap_or(usize::MAX);
        let mut rcpts = Vec::new();
        let mut addrs = Vec::new();
        for rcpt in progress.pending(env).cloned().collect::<Vec<String>>() {
            match Address::parse(&rcpt, true) {
                Ok(to) => {
                    rcpts.push(rcpt);
                    addrs.push(to);
                }
                Err(_) => progress
                    .failed
                    .push((rcpt, "invalid recipient address in the spool".into())),
            }
        }
        if addrs.is_empty() {
            return (0, String::new(), true);
        }
        // MAIL and every RCPT in one flight where the upstream pipelines.
        let begun = self
            .transport
            .begin(&env.account, from, params, Some(size), &addrs)
            .await;
        let (mut txn, verdicts) = match begun {
            Ok((txn, _, verdicts)) => (txn, verdicts),
            Err(BeginError::Upstream(UpstreamError::Reply(r))) if r.code >= 500 => {
                // The sender itself is refused: every pending recipient fails.
                let why = r.to_string();
                progress
                    .failed
                    .extend(rcpts.into_iter().map(|p| (p, why.clone())));
                return (r.code, r.text, false);
            }
            Err(e) => {
                let reply = outcome::mail_reply(Err(&e));
                return (0, reply.to_string(), true);
            }
        };
        let mut accepted = Vec::new();
        let mut last = (0u16, String::new());
        for (rcpt, verdict) in rcpts.into_iter().zip(verdicts) {
            match verdict {
                Ok(_) => accepted.push(rcpt),
                Err(UpstreamError::Reply(r)) if r.code >= 500 => {
                    progress.failed.push((rcpt, r.to_string()));
                    last = (r.code, r.text);
                }
                Err(UpstreamError::Reply(r)) => last = (r.code, r.text),
                Err(e) => return (0, e.to_string(), true),
            }
        }
        if accepted.is_empty() {
            txn.abort().await;
            return (last.0, last.1, true);
        }
        let r = match txn.start_data().await {
            Ok(_) => stream_body(&mut txn, &mut body, &env.id).await,
            Err(e) => Err(e),
        };
        *retry_after = txn.retry_after();
        // Graph: the HTTP status that decided it is the relay log's upstream_code (SPEC).
        let status = txn.upstream_status();
        txn.finish().await;
        let (code, text, transient) = match r {
            Ok(up) => {
                progress.delivered.extend(accepted);
                if let Err(e) = self.spool.save_progress_async(&env.id, progress).await {
                    tracing::error!(id = %env.id, error = %e, "cannot record delivery progress");
                }
                (up.code, up.text, true)
            }
            Err(UpstreamError::Reply(r)) if r.code >= 500 => {
                let why = r.to_string();
                progress
                    .failed
                    .extend(accepted.into_iter().map(|a| (a, why.clone())));
                (r.code, r.text, false)
            }
            Err(UpstreamError::Reply(r)) => (r.code, r.text, true),
            Err(e) => (0, e.to_string(), true),
        };
        (status.unwrap_or(code), text, transient)
    }

    /// Follows a reloaded configuration: `messages_per_minute` for the next sends; a new
    /// account gets its queue and `max_sessions_per_mailbox` workers; a removed account's
    /// workers stop after the delivery they are in, and its messages stay in the spool
    /// (neither delivered nor moved to dead: `max_age` is not counted against them here)
    /// until a reload brings the account back, when they are delivered. Per-account
    /// workers of unchanged accounts carry on.
    pub(crate) fn reconfigure(self: &Arc<Self>, config: &Config) {
        self.per_minute.store(
            config.upstream.messages_per_minute,
            std::sync::atomic::Ordering::Relaxed,
        );
        *lock(&self.mailboxes) = mailboxes_of(config);
        let mut reload = lock(&self.reload);
        for name in self.accounts.names() {
            if config.accounts.iter().any(|a| a.username == name) {
                continue;
            }
            if let Some(token) = reload.workers.remove(&name) {
                token.cancel();
            }
            if let Some(aq) = self.accounts.remove(&name) {
                let waiting = lock(&aq.items).len();
                tracing::info!(account = %name, messages = waiting, "account removed: its spooled messages stay in the spool until it is configured again");
                reload.dormant.insert(name, aq);
            }
        }
        for a in &config.accounts {
            if self.accounts.get(&a.username).is_some() {
                continue;
            }
            let aq = reload.dormant.remove(&a.username).unwrap_or_else(|| {
                Arc::new(AccountQueue {
                    items: Mutex::new(BTreeMap::new()),
                    wake: Notify::new(),
                })
            });
            let waiting = lock(&aq.items).len();
            if waiting > 0 {
                tracing::info!(account = %a.username, messages = waiting, "account configured again: delivering its spooled messages");
            }
            self.accounts.insert(&a.username, aq);
            let token = reload.shutdown.child_token();
            reload.workers.insert(a.username.clone(), token.clone());
            for _ in 0..config.upstream.max_sessions_per_mailbox {
                let q = self.clone();
                let name = a.username.clone();
                let token = token.clone();
                self.workers
                    .spawn(async move { q.work(&name, token).await });
            }
        }
    }

    /// The token that stops `account`'s workers (process shutdown, or the account removed
    /// by a reload).
    fn worker_token(&self, account: &str) -> CancellationToken {
        let mut reload = lock(&self.reload);
        let token = reload.shutdown.child_token();
        reload
            .workers
            .entry(account.to_string())
            .or_insert(token)
            .clone()
    }
}

/// What reloads need of the queue: the process's shutdown token, each account's worker
/// token, and the queues of removed accounts (kept with their messages).
struct Reload {
    shutdown: CancellationToken,
    workers: HashMap<String, CancellationToken>,
    dormant: HashMap<String, Arc<AccountQueue>>,
}

impl Reload {
    fn new(shutdown: &CancellationToken) -> Reload {
        Reload {
            shutdown: shutdown.clone(),
            workers: HashMap::new(),
            dormant: HashMap::new(),
        }
    }
}

/// The per-account queues, replaced entry by entry on reload; workers and callers hold the
/// entry they looked up.
struct AccountQueues(Mutex<HashMap<String, Arc<AccountQueue>>>);

impl AccountQueues {
    fn new(map: HashMap<String, AccountQueue>) -> AccountQueues {
        AccountQueues(Mutex::new(
            map.into_iter().map(|(k, v)| (k, Arc::new(v))).collect(),
        ))
    }

    fn get(&self, account: &str) -> Option<Arc<AccountQueue>> {
        lock(&self.0).get(account).cloned()
    }

    fn contains_key(&self, account: &str) -> bool {
        lock(&self.0).contains_key(account)
    }

    fn values(&self) -> Vec<Arc<AccountQueue>> {
        lock(&self.0).values().cloned().collect()
    }

    fn names(&self) -> Vec<String> {
        lock(&self.0).keys().cloned().collect()
    }

    fn insert(&self, account: &str, aq: Arc<AccountQueue>) {
        lock(&self.0).insert(account.to_string(), aq);
    }

    fn remove(&self, account: &str) -> Option<Arc<AccountQueue>> {
        lock(&self.0).remove(account)
    }
}

/// Every account's [`Pacer`], shared by the sessions (sync mode reports the rate) and the
/// spool workers (spool mode holds to it); a reload adds and drops accounts' pacers and
/// keeps the others' windows.
#[derive(Debug, Default)]
pub struct Pacers(Mutex<HashMap<String, Arc<Pacer>>>);

impl Pacers {
    pub fn new(config: &Config) -> Pacers {
        let p = Pacers::default();
        p.follow(config);
        p
    }

    pub fn get(&self, account: &str) -> Option<Arc<Pacer>> {
        lock(&self.0).get(account).cloned()
    }

    /// Keeps the pacers of accounts still configured, adds new ones, drops the rest.
    pub(crate) fn follow(&self, config: &Config) {
        let mut map = lock(&self.0);
        let mut next = HashMap::new();
        for a in &config.accounts {
            let p = map.remove(&a.username).unwrap_or_default();
            next.insert(a.username.clone(), p);
        }
        *map = next;
    }
}

/// The spooled content to the upstream in pieces of [`BODY_CHUNK`] bytes, then the final
/// verdict. A file that cannot be read mid-way loses the transaction (no final dot: the
/// connection is dropped) and is retried like a lost connection.
async fn stream_body(
    txn: &mut Transaction,
    body: &mut BufReader<File>,
    id: &str,
) -> Result<UpReply, UpstreamError> {
    let mut buf = vec![0u8; BODY_CHUNK];
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => return txn.finish_content().await,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!(%id, error = %e, "cannot read the spooled message mid-way");
                txn.break_off();
                return Err(UpstreamError::Lost(format!("spool file unreadable: {e}")));
            }
        };
        txn.send_chunk(&buf[..n]).await?;
    }
}

#[cfg(test)]
mod tests {
    //! Pacing and backoff in paused time; the retry schedule of a spooled message against
    //! testkit's fakes (socket I/O in real time, the waits between attempts skipped in paused
    //! time: see `pool::tests` for why).
    use super::*;
    use crate::relay::pool::tests::{remote, skip, skip_by, until, Remote, ACCOUNT, MAILBOX};
    use crate::relay::pool::Pool;
    use crate::relay::spool::SPOOL_VERSION;
    use crate::relay::upstream::UpstreamTarget;
    use testkit::Reply;

    const RETRY_MIN: Duration = Duration::from_secs(60);
    const RETRY_MAX: Duration = Duration::from_secs(1800);

    #[tokio::test(start_paused = true)]
    async fn pacer_holds_to_the_limit_over_a_sliding_minute() {
        let p = Pacer::default();
        assert_eq!(p.wait(3), Duration::ZERO);
        assert_eq!(p.note(), 1);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(p.note(), 2);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(p.wait(3), Duration::ZERO);
        assert_eq!(p.note(), 3);
        // Full: the next send waits until the first leaves the window (t = 60 s).
        assert_eq!(p.wait(3), Duration::from_secs(40));
        assert_eq!(p.wait(4), Duration::ZERO);
        assert_eq!(p.wait(0), Duration::ZERO, "0 = no limit");
        tokio::time::advance(Duration::from_millis(39_999)).await;
        assert_eq!(p.wait(3), Duration::from_millis(1));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(p.wait(3), Duration::ZERO);
        // The window slides: sends at 10, 20 and 60 s.
        assert_eq!(p.note(), 3);
        assert_eq!(p.wait(3), Duration::from_secs(10));
        assert_eq!(
            p.wait(1),
            Duration::from_secs(10),
            "the oldest of the window"
        );
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(p.wait(1), Duration::ZERO);
        assert_eq!(p.note(), 1);
    }

    /// A queue (spool mode) for the fakes of `r`, its workers running.
    fn queue(r: &Remote, shutdown: &CancellationToken) -> Arc<Queue> {
        let tokens = crate::oauth::manager::TokenManager::new(&r.config).expect("tokens");
        let target = UpstreamTarget::new(&r.config.upstream).expect("target");
        let pool = Pool::new(&r.config, target, tokens);
        let q = r.config.queue.clone().expect("[queue] configured");
        let pacers = Arc::new(Pacers::new(&r.config));
        Queue::start(
            &r.config,
            &q,
            Transport::smtp(pool),
            pacers,
            Arc::new(Metrics::default()),
            shutdown.clone(),
        )
        .expect("queue starts")
    }

    fn spool_config() -> String {
        format!(
            "[queue]\nmode = \"spool\"\nretry_min_secs = {}\nretry_max_secs = {}\n",
            RETRY_MIN.as_secs(),
            RETRY_MAX.as_secs()
        )
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_from_retry_min_to_retry_max_with_at_most_a_quarter_jitter() {
        let r = remote(Duration::from_secs(3600), "", &spool_config()).await;
        let shutdown = CancellationToken::new();
        let q = queue(&r, &shutdown);
        for attempts in 1..=20u32 {
            let base = (RETRY_MIN * 2u32.pow((attempts - 1).min(16))).min(RETRY_MAX);
            let most = (base + base / 4).min(RETRY_MAX);
            for _ in 0..50 {
                let d = q.backoff(attempts);
                assert!(
                    d >= base && d <= most,
                    "attempt {attempts}: {d:?} not in {base:?}..={most:?}"
                );
            }
        }
        assert_eq!(
            q.backoff(6),
            RETRY_MAX,
            "60 s * 2^5 = 32 min is past retry_max"
        );
        // The jitter is there: 100 draws are not all the same.
        let first = q.backoff(1);
        assert!((0..100).any(|_| q.backoff(1) != first));
        shutdown.cancel();
        q.stopped().await;
    }

    /// The single message's queue entry: (attempts so far, in flight, next attempt).
    fn entry(q: &Queue) -> Option<(u32, bool, Instant)> {
        let aq = q.accounts.get(ACCOUNT)?;
        let items = lock(&aq.items);
        let item = items.values().next()?;
        Some((item.progress.attempts, item.in_flight, item.next_attempt))
    }

    fn mails(r: &Remote) -> usize {
        r.upstream
            .log()
            .iter()
            .filter(|l| l.contains(" MAIL FROM:"))
            .count()
    }

    /// Waits until attempt `n` is over; returns when the next is due.
    async fn attempt_over(q: &Queue, n: u32) -> Instant {
        until(
            &format!("attempt {n} to end"),
            || matches!(entry(q), Some((a, false, _)) if a == n),
        )
        .await;
        entry(q).expect("still queued").2
    }

    /// Skips (paused) to just before `due`: nothing is sent early. Then to `due`, and
    /// resumes real time as the attempt starts.
    async fn run_attempt_at(q: &Queue, r: &Remote, due: Instant, sent_before: usize) {
        tokio::time::pause();
        let early = due
            .saturating_duration_since(Instant::now())
            .saturating_sub(Duration::from_millis(5));
        skip_by(early, Duration::from_millis(100)).await;
        assert_eq!(mails(r), sent_before, "no attempt before it is due");
        assert!(!entry(q).expect("queued").1);
        skip(due.saturating_duration_since(Instant::now())).await;
        tokio::time::resume();
    }

    #[tokio::test]
    async fn a_deferred_message_is_retried_with_backoff_and_delivered_once() {
        let extra = format!("{}max_age_secs = 86400\n", spool_config());
        let r = remote(Duration::from_secs(3600), "messages_per_minute = 0", &extra).await;
        r.upstream
            .set_data_reply(Some(Reply::new(451, "4.3.0 Try again later")));
        let shutdown = CancellationToken::new();
        let q = queue(&r, &shutdown);
        let env = Envelope {
            version: SPOOL_VERSION,
            id: "M1".into(),
            account: ACCOUNT.into(),
            from: MAILBOX.into(),
            params: String::new(),
            rcpts: vec!["x@example.org".into()],
            received_at: unix_now(),
            bytes: 18,
        };
        let first = Instant::now();
        q.accept(env, b"Subject: t\r\n\r\nhi\r\n").await.unwrap();

        // Attempt 1 at once: 451, so attempt 2 is due retry_min (+ up to 25 %) later.
        let due2 = attempt_over(&q, 1).await;
        let after1 = Instant::now();
        assert_eq!(mails(&r), 1);
        assert!(due2 >= first + RETRY_MIN, "{:?}", due2 - first);
        assert!(due2 <= after1 + RETRY_MIN + RETRY_MIN / 4);
        run_attempt_at(&q, &r, due2, 1).await;

        // Attempt 2: 451 again, so attempt 3 is due 2 * retry_min (+ up to 25 %) later.
        let due3 = attempt_over(&q, 2).await;
        let after2 = Instant::now();
        assert_eq!(mails(&r), 2);
        assert!(due3 >= due2 + 2 * RETRY_MIN, "{:?}", due3 - due2);
        assert!(due3 <= after2 + 2 * RETRY_MIN + RETRY_MIN / 2);
        assert!(r.upstream.received().is_empty());
        r.upstream.set_data_reply(None);
        run_attempt_at(&q, &r, due3, 2).await;

        // Attempt 3: 250. Delivered once, gone from the queue and the spool.
        let got = r.upstream.wait_received(1, Duration::from_secs(10)).await;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].rcpts, ["x@example.org"]);
        assert_eq!(got[0].data, b"Subject: t\r\n\r\nhi\r\n");
        until("the message to leave the queue", || entry(&q).is_none()).await;
        assert_eq!(q.depth().0, 0);
        let spool = r.config.state.dir.join("spool");
        assert!(!spool.join("M1.msg").exists() && !spool.join("M1.state").exists());
        // Nothing more is sent, however long we wait.
        tokio::time::pause();
        skip_by(RETRY_MAX * 2, Duration::from_secs(1)).await;
        tokio::time::resume();
        assert_eq!(mails(&r), 3);
        assert_eq!(r.upstream.received().len(), 1);
        shutdown.cancel();
        q.stopped().await;
    }

    #[tokio::test]
    async fn a_worker_skips_a_message_whose_lock_is_held_and_delivers_it_once_after() {
        let r = remote(
            Duration::from_secs(3600),
            "messages_per_minute = 0",
            &spool_config(),
        )
        .await;
        let env = Envelope {
            version: SPOOL_VERSION,
            id: "L1".into(),
            account: ACCOUNT.into(),
            from: MAILBOX.into(),
            params: String::new(),
            rcpts: vec!["x@example.org".into()],
            received_at: unix_now(),
            bytes: 18,
        };
        // In the spool before the queue starts, its lock held (as a `queue` command would).
        let spool = Spool::open(&r.config.state.dir, u64::MAX).unwrap();
        spool.store(&env, b"Subject: t\r\n\r\nhi\r\n").unwrap();
        let Locked::Held(held) = Spool::at(&r.config.state.dir).try_lock("L1").unwrap() else {
            panic!("lock not taken")
        };
        let shutdown = CancellationToken::new();
        let q = queue(&r, &shutdown);
        // Attempted at once and skipped, again and again, while the lock is held.
        tokio::time::sleep(LOCK_BUSY_RETRY * 3).await;
        assert_eq!(mails(&r), 0, "nothing sent while the lock is held");
        assert!(matches!(entry(&q), Some((0, _, _))), "no attempt counted");
        drop(held);
        let got = r.upstream.wait_received(1, Duration::from_secs(10)).await;
        assert_eq!(got.len(), 1);
        until("the message to leave the queue", || entry(&q).is_none()).await;
        tokio::time::sleep(LOCK_BUSY_RETRY * 2).await;
        assert_eq!(mails(&r), 1, "delivered exactly once");
        assert_eq!(r.upstream.received().len(), 1);
        shutdown.cancel();
        q.stopped().await;
    }
}
