//! Local credentials: which local user name and password open which account, and the
//! bounds on what verifying them may cost.
//!
//! argon2 verification is deliberately slow and takes ~19 MiB per check, so an outsider
//! who sends wrong passwords must not be able to make us run many at once: checks run on
//! a fixed set of [`VERIFIER_THREADS`] threads (so the memory they use is bounded and
//! reused, not one allocator arena per blocking thread), fed by a queue of at most
//! [`VERIFY_QUEUE`] waiting checks; beyond that an AUTH is answered 454 at once. A client
//! address with too many recent failures ([`MAX_ADDRESS_FAILURES`], decaying) gets no
//! further argon2 checks until its score decays: only a password already verified (the
//! cache below) still works from there.
//!
//! Every failure costs one argon2 check, whether the user is unknown, has a
//! `password_hash`, or a plain `password_env` (compared in constant time, then a dummy
//! check), so timing does not reveal which user names exist. A successful verification is
//! remembered as a keyed BLAKE2b hash of user and password under a random per-process key,
//! so the same client's next AUTH costs microseconds while any other password still pays
//! the full price. A wrong password never reaches the token store.
//!
//! A configuration reload ([`LocalAuth::reloaded`]) makes a new `LocalAuth` for the new
//! accounts that shares the verifier threads, the cache key and the per-address failure
//! scores with the old one, and carries over the cache entries of users whose password is
//! unchanged only: a changed password fails at once, even if the old one was cached. The SMTP dialogue and the
//! per-connection failure limit are the session's business.

use crate::config::{Account, Config, LocalPassword};
use crate::secret::Secret;
use crate::sync::lock;
use argon2::{Argon2, PasswordHash, PasswordVerifier};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// Verified against when the user name is unknown or its password is plain, so timing does
/// not reveal user names.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$Jp1ow0uvWhc1W3f1KrGmwcdG7OcaI+UEmOsLVYaHy6k";

/// Threads that run argon2 checks: about two per core (each check holds ~19 MiB while it
/// runs); at least 2, at most 16.
pub(crate) fn verifier_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(2, |n| n.get() * 2)
        .clamp(2, 16)
}
/// Checks that may wait for a verifier thread; more are refused at once with 454.
pub(crate) const VERIFY_QUEUE: usize = 64;
/// Recent failed AUTHs from one client address before it gets no more argon2 checks.
pub(crate) const MAX_ADDRESS_FAILURES: f64 = 30.0;
/// How fast an address's failure score decays (one failure forgiven per this interval).
pub(crate) const ADDRESS_FAILURE_DECAY: Duration = Duration::from_secs(10);
/// Client addresses we remember failures of (oldest forgotten first beyond this).
const MAX_TRACKED_ADDRESSES: usize = 10_000;

/// The outcome of one AUTH.
#[derive(Debug)]
pub(crate) enum Verdict {
    Ok(Arc<Account>),
    /// Wrong user name or password.
    Denied,
    /// This client address failed too often recently; nothing was checked.
    Throttled,
    /// Too many checks are waiting; nothing was checked (try again later).
    Busy,
}

struct Job {
    hash: String,
    password: Secret,
    done: oneshot::Sender<bool>,
}

#[derive(Clone)]
pub(crate) struct LocalAuth {
    users: Arc<HashMap<String, Arc<Account>>>,
    /// Per-process random key for the verified-password cache.
    key: Arc<[u8; 32]>,
    /// user -> keyed hash of the password that last verified.
    verified: Arc<Mutex<HashMap<String, [u8; 32]>>>,
    /// Recent failures per client address: (score, when it was last updated).
    failures: Arc<Mutex<HashMap<IpAddr, (f64, Instant)>>>,
    jobs: mpsc::Sender<Job>,
}

impl std::fmt::Debug for LocalAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalAuth")
            .field("users", &self.users.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Keyed BLAKE2b-256 of `user NUL password`.
fn fingerprint(key: &[u8; 32], user: &str, password: &Secret) -> [u8; 32] {
    use blake2::digest::{Mac, Update};
    let mut mac = blake2::Blake2bMac::<blake2::digest::consts::U32>::new_from_slice(key)
        .expect("a 32-byte key is valid for BLAKE2b");
    Update::update(&mut mac, user.as_bytes());
    Update::update(&mut mac, &[0]);
    Update::update(&mut mac, password.expose().as_bytes());
    mac.finalize().into_bytes().into()
}

/// Starts the verifier threads; they end when every sender (every `LocalAuth`) is gone.
fn start_verifiers() -> mpsc::Sender<Job> {
    let (tx, rx) = mpsc::channel::<Job>(VERIFY_QUEUE);
    let rx = Arc::new(Mutex::new(rx));
    for i in 0..verifier_threads() {
        let rx = rx.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("argon2-{i}"))
            .spawn(move || {
                // One argon2 memory buffer per thread, allocated at the first check and
                // reused: repeated ~19 MiB allocations fragment the allocator's arenas, and
                // a flood of checks then keeps hundreds of MiB resident.
                let mut blocks = Vec::new();
                loop {
                    let job = lock(&rx).blocking_recv();
                    let Some(job) = job else { return };
                    let ok = verify_hash_with(&job.hash, &job.password, &mut blocks);
                    let _ = job.done.send(ok);
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a password verifier thread");
        }
    }
    tx
}

impl LocalAuth {
    pub fn new(config: &Config) -> LocalAuth {
        let mut key = [0u8; 32];
        // Without randomness the cache is still correct, only its key is guessable; the
        // cached values never leave the process.
        let _ = getrandom::getrandom(&mut key);
        LocalAuth {
            key: Arc::new(key),
            verified: Arc::new(Mutex::new(HashMap::new())),
            failures: Arc::new(Mutex::new(HashMap::new())),
            jobs: start_verifiers(),
            users: Arc::new(
                config
                    .accounts
                    .iter()
                    .map(|a| (a.username.clone(), Arc::new(a.clone())))
                    .collect(),
            ),
        }
    }

    /// The `LocalAuth` for a reloaded configuration: same verifier threads, cache key and
    /// failure scores; the verified-password cache keeps only users that still exist with
    /// the same password.
    pub fn reloaded(&self, config: &Config) -> LocalAuth {
        let users: HashMap<String, Arc<Account>> = config
            .accounts
            .iter()
            .map(|a| (a.username.clone(), Arc::new(a.clone())))
            .collect();
        let verified: HashMap<String, [u8; 32]> = lock(&self.verified)
            .iter()
            .filter(
                |(user, _)| match (self.users.get(*user), users.get(*user)) {
                    (Some(old), Some(new)) => same_password(&old.password, &new.password),
                    _ => false,
                },
            )
            .map(|(u, fp)| (u.clone(), *fp))
            .collect();
        LocalAuth {
            users: Arc::new(users),
            key: self.key.clone(),
            verified: Arc::new(Mutex::new(verified)),
            failures: self.failures.clone(),
            jobs: self.jobs.clone(),
        }
    }

    /// Checks `username` / `password` from a client at `peer`.
    pub(crate) async fn verify(&self, peer: IpAddr, username: &str, password: Secret) -> Verdict {
        let account = self.users.get(username).cloned();
        let fp = fingerprint(&self.key, username, &password);
        if let Some(a) = &account {
            if lock(&self.verified)
                .get(username)
                .is_some_and(|c| ct_eq(c, &fp))
            {
                return Verdict::Ok(a.clone());
            }
        }
        if self.address_score(peer) >= MAX_ADDRESS_FAILURES {
            return Verdict::Throttled;
        }
        let (hash, plain_ok) = match account.as_ref().map(|a| &a.password) {
            Some(LocalPassword::Plain(expected)) => {
                if ct_eq(expected.expose().as_bytes(), password.expose().as_bytes()) {
                    return self.success(account, username, fp);
                }
                (DUMMY_HASH.to_string(), false)
            }
            Some(LocalPassword::Hash(h)) => (h.expose().to_string(), true),
            None => (DUMMY_HASH.to_string(), false),
        };
        let (done, result) = oneshot::channel();
        let job = Job {
            hash,
            password,
            done,
        };
        if self.jobs.try_send(job).is_err() {
            return Verdict::Busy;
        }
        // A closed channel (no verifier thread) is a failure, never a success.
        let ok = result.await.unwrap_or(false) && plain_ok;
        if ok {
            return self.success(account, username, fp);
        }
        self.note_failure(peer);
        Verdict::Denied
    }

    fn success(&self, account: Option<Arc<Account>>, username: &str, fp: [u8; 32]) -> Verdict {
        match account {
            Some(a) => {
                lock(&self.verified).insert(username.to_string(), fp);
                Verdict::Ok(a)
            }
            None => Verdict::Denied,
        }
    }

    /// The address's failure score now (decayed).
    fn address_score(&self, peer: IpAddr) -> f64 {
        let peer = client_key(peer);
        let now = Instant::now();
        lock(&self.failures)
            .get(&peer)
            .map_or(0.0, |(score, at)| decayed(*score, *at, now))
    }

    fn note_failure(&self, peer: IpAddr) {
        let peer = client_key(peer);
        let now = Instant::now();
        let mut f = lock(&self.failures);
        if f.len() >= MAX_TRACKED_ADDRESSES && !f.contains_key(&peer) {
            // Forget addresses whose score has decayed away, then the stalest one.
            f.retain(|_, (s, at)| decayed(*s, *at, now) >= 1.0);
            if f.len() >= MAX_TRACKED_ADDRESSES {
                if let Some(oldest) = f.iter().min_by_key(|(_, (_, at))| *at).map(|(k, _)| *k) {
                    f.remove(&oldest);
                }
            }
        }
        let e = f.entry(peer).or_insert((0.0, now));
        *e = (decayed(e.0, e.1, now) + 1.0, now);
    }
}

/// Whether two configured passwords are the same (same hash, or same variable and value).
fn same_password(a: &LocalPassword, b: &LocalPassword) -> bool {
    match (a, b) {
        (LocalPassword::Hash(x), LocalPassword::Hash(y)) => {
            ct_eq(x.expose().as_bytes(), y.expose().as_bytes())
        }
        (LocalPassword::Plain(x), LocalPassword::Plain(y)) => {
            x.var == y.var && ct_eq(x.expose().as_bytes(), y.expose().as_bytes())
        }
        _ => false,
    }
}

/// Whose failures an address counts as: an IPv4 address itself (also when it arrives
/// IPv4-mapped on an IPv6 socket), an IPv6 address by its /64 — one host or site usually
/// holds a whole /64, and rotating addresses inside it must not reset the score.
fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

fn decayed(score: f64, at: Instant, now: Instant) -> f64 {
    let forgiven = now.duration_since(at).as_secs_f64() / ADDRESS_FAILURE_DECAY.as_secs_f64();
    (score - forgiven).max(0.0)
}

/// The most argon2 memory one check may use (`m` in the PHC string, in KiB blocks): 256 MiB.
/// A configured hash asking for more is refused rather than allocated.
const MAX_ARGON2_BLOCKS: usize = 256 * 1024;

/// Verifies `password` against a PHC string (argon2id, argon2i or argon2d), with the
/// argon2 memory in `blocks` (grown once to what the hash needs, then reused).
fn verify_hash_with(phc: &str, password: &Secret, blocks: &mut Vec<argon2::Block>) -> bool {
    use argon2::{Algorithm, Params, Version};
    let Ok(h) = PasswordHash::new(phc) else {
        return false;
    };
    let (Ok(algorithm), Ok(params), Some(salt), Some(expected)) = (
        Algorithm::try_from(h.algorithm),
        Params::try_from(&h),
        h.salt,
        h.hash,
    ) else {
        return false;
    };
    let version = match h.version.map(Version::try_from) {
        None => Version::default(),
        Some(Ok(v)) => v,
        Some(Err(_)) => return false,
    };
    let mut salt_buf = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else {
        return false;
    };
    let needed = params.block_count();
    if needed > MAX_ARGON2_BLOCKS {
        tracing::error!(
            blocks = needed,
            "a password hash asks for more argon2 memory than allowed (256 MiB); refused"
        );
        return false;
    }
    if blocks.len() < needed {
        blocks.resize(needed, argon2::Block::default());
    }
    let mut out = vec![0u8; expected.len()];
    Argon2::new(algorithm, version, params)
        .hash_password_into_with_memory(
            password.expose().as_bytes(),
            salt,
            &mut out,
            &mut blocks[..needed],
        )
        .is_ok()
        && ct_eq(&out, expected.as_bytes())
}

/// Verifies `password` against a PHC string (argon2id, argon2i or argon2d).
pub fn verify_hash(phc: &str, password: &Secret) -> bool {
    match PasswordHash::new(phc) {
        Ok(h) => Argon2::default()
            .verify_password(password.expose().as_bytes(), &h)
            .is_ok(),
        Err(_) => false,
    }
}

/// Creates an argon2id PHC string with a random salt (for `hash-password`).
pub fn hash_password(password: &Secret) -> Result<String, argon2::password_hash::Error> {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let mut salt = [0u8; 16];
    getrandom::getrandom(&mut salt).map_err(|_| argon2::password_hash::Error::Crypto)?;
    let salt = SaltString::encode_b64(&salt)?;
    Ok(Argon2::default()
        .hash_password(password.expose().as_bytes(), &salt)?
        .to_string())
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i).copied().unwrap_or(0));
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_then_verify() {
        let pw = Secret::new("correct horse");
        let h = hash_password(&pw).unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_hash(&h, &pw));
        // The reusing verifier agrees, with a buffer reused across checks.
        let mut blocks = Vec::new();
        assert!(verify_hash_with(&h, &pw, &mut blocks));
        assert!(!verify_hash_with(
            &h,
            &Secret::new("correct horsf"),
            &mut blocks
        ));
        assert!(
            verify_hash_with(DUMMY_HASH, &Secret::new("x"), &mut blocks)
                == verify_hash(DUMMY_HASH, &Secret::new("x"))
        );
        let v2i = "$argon2i$v=19$m=4096,t=3,p=1$c29tZXNhbHRzb21lc2FsdA$ZVi8AdNhDtv0Kq9qNxsJ+qKJBbR8LzYh8Xpz3DGXs+Y";
        assert_eq!(
            verify_hash_with(v2i, &pw, &mut blocks),
            verify_hash(v2i, &pw)
        );
        assert!(!verify_hash_with("$argon2id$v=19$m=1048576,t=1,p=1$c29tZXNhbHRzb21lc2FsdA$Jp1ow0uvWhc1W3f1KrGmwcdG7OcaI+UEmOsLVYaHy6k", &pw, &mut blocks), "over the memory cap");
        assert!(!verify_hash(&h, &Secret::new("correct horsf")));
        assert!(!verify_hash("garbage", &pw));
    }

    #[tokio::test]
    async fn verified_passwords_are_remembered_wrong_ones_are_not() {
        let pw = Secret::new("s3cret");
        let toml = format!(
            "[[account]]\nusername = \"u\"\npassword_hash = \"{}\"\nmailbox = \"u@x.y\"\n[account.oauth]\nflow = \"client_credentials\"\ntenant = \"t\"\nclient_id = \"c\"\nclient_secret_env = \"S\"\n",
            hash_password(&pw).unwrap()
        );
        let config =
            Config::from_toml(&toml, "t", std::path::Path::new("."), &|_| Some("x".into()))
                .unwrap();
        let auth = LocalAuth::new(&config);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let ok = |v: Verdict| matches!(v, Verdict::Ok(_));
        assert!(matches!(
            auth.verify(ip, "u", Secret::new("wrong")).await,
            Verdict::Denied
        ));
        assert!(lock(&auth.verified).is_empty(), "failures are not cached");
        assert!(ok(auth.verify(ip, "u", pw.clone()).await));
        assert_eq!(lock(&auth.verified).len(), 1);
        // The cached value is a keyed hash, not the password.
        let cached = lock(&auth.verified)["u"];
        assert_ne!(&cached[..6], b"s3cret");
        assert!(
            ok(auth.verify(ip, "u", pw.clone()).await),
            "second AUTH from the cache"
        );
        assert!(
            matches!(
                auth.verify(ip, "u", Secret::new("wrong")).await,
                Verdict::Denied
            ),
            "a wrong password still fails"
        );
        assert!(matches!(
            auth.verify(ip, "nobody", pw).await,
            Verdict::Denied
        ));
        assert!(!format!("{auth:?}").contains("s3cret"));
    }

    fn config_with(accounts: &str) -> Config {
        Config::from_toml(accounts, "t", std::path::Path::new("."), &|_| {
            Some("plain-pw".into())
        })
        .unwrap()
    }

    const PLAIN_ACCOUNT: &str = "[[account]]\nusername = \"p\"\npassword_env = \"P\"\nmailbox = \"p@x.y\"\n[account.oauth]\nflow = \"client_credentials\"\ntenant = \"t\"\nclient_id = \"c\"\nclient_secret_env = \"S\"\n";

    #[tokio::test(start_paused = true)]
    async fn an_address_with_many_failures_gets_no_more_checks_until_it_decays() {
        let auth = LocalAuth::new(&config_with(PLAIN_ACCOUNT));
        let bad: IpAddr = "127.0.0.9".parse().unwrap();
        let good: IpAddr = "127.0.0.10".parse().unwrap();
        // The plain password is right: it was never cached, and it still works elsewhere.
        for _ in 0..MAX_ADDRESS_FAILURES as usize {
            assert!(matches!(
                auth.verify(bad, "p", Secret::new("x")).await,
                Verdict::Denied
            ));
        }
        assert!(matches!(
            auth.verify(bad, "p", Secret::new("x")).await,
            Verdict::Throttled
        ));
        assert!(matches!(
            auth.verify(bad, "p", Secret::new("plain-pw")).await,
            Verdict::Throttled
        ));
        assert!(matches!(
            auth.verify(good, "p", Secret::new("plain-pw")).await,
            Verdict::Ok(_)
        ));
        // Once verified, the password is cached and works even from the throttled address.
        assert!(matches!(
            auth.verify(bad, "p", Secret::new("plain-pw")).await,
            Verdict::Ok(_)
        ));
        // The score decays: a few intervals later the address is checked again.
        tokio::time::advance(ADDRESS_FAILURE_DECAY * 2).await;
        assert!(matches!(
            auth.verify(bad, "p", Secret::new("y")).await,
            Verdict::Denied
        ));
    }

    /// A wrong password costs one argon2 check whether the user is unknown ("nobody") or has
    /// a plain `password_env` ("p"): so both fill the verifier queue alike (no timing oracle).
    #[test]
    fn failures_count_per_ipv4_address_and_per_ipv6_64() {
        let k = |s: &str| client_key(s.parse().unwrap());
        assert_eq!(k("10.0.5.7"), k("::ffff:10.0.5.7"));
        assert_ne!(k("10.0.5.7"), k("10.0.5.8"));
        assert_eq!(k("2001:db8:1:2::1"), k("2001:db8:1:2:ffff:1:2:3"));
        assert_ne!(k("2001:db8:1:2::1"), k("2001:db8:1:3::1"));
    }

    #[tokio::test]
    async fn a_full_queue_answers_busy_without_checking() {
        for user in ["nobody", "p"] {
            flood_gets_busy(user).await;
        }
    }

    async fn flood_gets_busy(user: &'static str) {
        let auth = LocalAuth::new(&config_with(PLAIN_ACCOUNT));
        let mut tasks = Vec::new();
        // Far more concurrent wrong AUTHs than threads + queue, each from its own address.
        for i in 0..(VERIFY_QUEUE + verifier_threads() + 40) {
            let auth = auth.clone();
            let ip = IpAddr::from([10, 0, (i / 250) as u8, (i % 250) as u8]);
            tasks.push(tokio::spawn(async move {
                auth.verify(ip, user, Secret::new("x")).await
            }));
        }
        let mut busy = 0;
        let mut denied = 0;
        for t in tasks {
            match t.await.unwrap() {
                Verdict::Busy => busy += 1,
                Verdict::Denied => denied += 1,
                v => panic!("unexpected {v:?}"),
            }
        }
        assert!(busy >= 40, "busy {busy}, denied {denied}");
        assert!(denied <= VERIFY_QUEUE + verifier_threads() + 40 - busy);
        assert!(denied >= VERIFY_QUEUE, "denied {denied}");
    }

    #[tokio::test]
    async fn a_reload_forgets_a_changed_password_at_once_and_keeps_the_rest() {
        let (old_pw, new_pw, other_pw) = (
            Secret::new("old-pw"),
            Secret::new("new-pw"),
            Secret::new("other-pw"),
        );
        let account = |user: &str, pw: &Secret| {
            format!(
                "[[account]]\nusername = \"{user}\"\npassword_hash = \"{}\"\nmailbox = \"{user}@x.y\"\n[account.oauth]\nflow = \"client_credentials\"\ntenant = \"t\"\nclient_id = \"c\"\nclient_secret_env = \"S\"\n",
                hash_password(pw).unwrap()
            )
        };
        let other = account("o", &other_pw);
        let before = config_with(&format!("{}{other}", account("u", &old_pw)));
        let after = config_with(&format!("{}{other}", account("u", &new_pw)));
        let auth = LocalAuth::new(&before);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let ok = |v: Verdict| matches!(v, Verdict::Ok(_));
        assert!(ok(auth.verify(ip, "u", old_pw.clone()).await));
        assert!(ok(auth.verify(ip, "o", other_pw.clone()).await));
        assert_eq!(lock(&auth.verified).len(), 2);
        auth.note_failure(ip);

        let next = auth.reloaded(&after);
        // Only the unchanged user's cache entry came along; the failure score is shared.
        assert_eq!(
            lock(&next.verified).keys().collect::<Vec<_>>(),
            vec![&"o".to_string()]
        );
        assert!((next.address_score(ip) - 1.0).abs() < 0.01);
        assert!(matches!(
            next.verify(ip, "u", old_pw.clone()).await,
            Verdict::Denied
        ));
        assert!(ok(next.verify(ip, "u", new_pw).await));
        assert!(ok(next.verify(ip, "o", other_pw).await));
        // The old LocalAuth (sessions in flight) still has the old settings.
        assert!(ok(auth.verify(ip, "u", old_pw).await));
        // A removed user is gone from the new one.
        let gone = next.reloaded(&config_with(&other));
        assert!(matches!(
            gone.verify(ip, "u", Secret::new("new-pw")).await,
            Verdict::Denied
        ));
    }

    #[test]
    fn constant_time_compare() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"abcd"));
        assert!(!ct_eq(b"", b"a"));
    }
}
