//! The thread pool every parallel call of the crate runs on, one per process.
//!
//! Why not rayon's global pool: it cannot survive `fork()`. A forked child
//! inherits the pool's state (its queues, its count of sleeping workers) but
//! none of its threads, so the first parallel call in the child waits forever
//! for workers that do not exist. That is how Python's `multiprocessing`
//! starts children by default on Linux and how torch DataLoader workers start.
//! So the pool lives here with the id of the process that built it, and a
//! process that finds another process's pool (a forked child) builds its own.
//! The inherited one is leaked, never dropped: its threads do not exist in the
//! child, and dropping it would try to stop them.
//!
//! The pool is built as rayon builds its global one (`RAYON_NUM_THREADS`
//! threads, else one per CPU), so the thread count is what it always was.

use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};

use rayon::{ThreadPool, ThreadPoolBuilder};

/// A pool and the process that built it.
struct Owned {
    pid: u32,
    pool: ThreadPool,
}

/// The current pool, or null before the first parallel call (and in a child
/// right after `fork`). A non-null pointer is a leaked `Box` that is never
/// freed, so a reference taken from it lives as long as the process.
/// Lock-free on purpose: a lock held by another thread at the moment of
/// `fork` would stay locked forever in the child.
static POOL: AtomicPtr<Owned> = AtomicPtr::new(ptr::null_mut());

/// Runs `f` on this process's pool: parallel iterators inside it use that
/// pool's workers. Every parallel site of the crate goes through here, never
/// through rayon's global pool, so that the crate keeps working in a child
/// forked after the parent used it (see the module docs).
pub fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    current().install(f)
}

/// This process's pool, built on first use in each process.
fn current() -> &'static ThreadPool {
    let pid = std::process::id();
    loop {
        let seen = POOL.load(Ordering::Acquire);
        // SAFETY: non-null pointers in POOL come from `Box::into_raw` below
        // and are never freed (see POOL).
        if let Some(owned) = unsafe { seen.as_ref() } {
            if owned.pid == pid {
                return &owned.pool;
            }
        }
        // None yet, or one built by the parent of this forked process: build ours.
        forget_pool_in_forked_children();
        let fresh = Box::into_raw(Box::new(Owned { pid, pool: build() }));
        match POOL.compare_exchange(seen, fresh, Ordering::AcqRel, Ordering::Acquire) {
            // `seen` (null, or the parent's pool) is left as it is: leaked.
            // SAFETY: just stored, never freed.
            Ok(_) => return unsafe { &(*fresh).pool },
            // Another thread of this process stored one first: use that one.
            // SAFETY: `fresh` was never shared; its workers are this process's
            // threads, so dropping it stops them normally.
            Err(_) => drop(unsafe { Box::from_raw(fresh) }),
        }
    }
}

fn build() -> ThreadPool {
    // Thread count as rayon's global pool: RAYON_NUM_THREADS, else the CPUs.
    ThreadPoolBuilder::new()
        .thread_name(|i| format!("qdelta-{i}"))
        .build()
        // rayon's global pool panics the same way; the bindings turn a panic
        // into a QDeltaError.
        .unwrap_or_else(|e| panic!("qdelta: could not start the thread pool: {e}"))
}

/// Clears POOL in every child `fork` makes, so that a child never uses its
/// parent's pool even if it got the pid of the process that built it (a pid
/// reused after that process exited, in a child of a child). The pid check
/// in `current` stays for platforms or cases where the handler is missing.
fn forget_pool_in_forked_children() {
    #[cfg(unix)]
    {
        static REGISTERED: AtomicBool = AtomicBool::new(false);
        // Runs in the child right after fork: only an atomic store, which is
        // async-signal-safe.
        extern "C" fn in_child() {
            POOL.store(ptr::null_mut(), Ordering::Release);
        }
        if !REGISTERED.swap(true, Ordering::AcqRel) {
            // SAFETY: registers a handler that only stores to an atomic. A
            // failure (ENOMEM) leaves the pid check alone, which is enough but
            // for pid reuse.
            unsafe { libc::pthread_atfork(None, None, Some(in_child)) };
        }
    }
}

#[cfg(test)]
mod tests {
    use rayon::prelude::*;

    use super::*;

    #[test]
    fn runs_on_one_pool_of_the_default_size() {
        let (threads, name) = install(|| {
            (
                rayon::current_num_threads(),
                std::thread::current().name().map(str::to_owned),
            )
        });
        let want = std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        assert_eq!(threads, want);
        assert!(name.is_some_and(|n| n.starts_with("qdelta-")));
        let sum: u64 = install(|| (0..10_000u64).into_par_iter().sum());
        assert_eq!(sum, 10_000 * 9_999 / 2);
    }

    #[test]
    fn a_pool_of_another_process_is_replaced_not_used() {
        let mine = current();
        // What a forked child sees: a pool whose pid is not its own.
        let stale = Box::into_raw(Box::new(Owned {
            pid: std::process::id().wrapping_add(1),
            pool: ThreadPoolBuilder::new().num_threads(1).build().unwrap(),
        }));
        let prev = POOL.swap(stale, Ordering::AcqRel);
        let fresh = current();
        assert!(!ptr::eq(fresh, &unsafe { &*stale }.pool));
        assert_eq!(install(|| (0..100u32).into_par_iter().sum::<u32>()), 4950);
        // Put the original back (tests share POOL); the other two are leaked.
        POOL.store(prev, Ordering::Release);
        assert!(ptr::eq(current(), mine));
    }
}
