//! Trying a risky load in a child process first. Loading a library runs its initialisers, and a
//! damaged file, or a library built for something else, can crash there: in-process, that kills
//! flint before doctor says a word. A forked child takes the crash instead, and the library is
//! reported and passed over.

use std::time::{Duration, Instant};

/// Long enough for cuBLASLt (half a gigabyte) from a slow network file system; a load that
/// takes longer is as unusable as one that crashes.
const LIMIT: Duration = Duration::from_secs(60);

/// Runs `trial` in a forked child and says whether the child survived it. When this process
/// cannot fork, the trial is skipped (`Ok`): the load then happens in-process, as without it.
pub(crate) fn survives(trial: impl FnOnce()) -> Result<(), String> {
    // SAFETY: the child only runs `trial` (loader calls and allocation, which glibc keeps
    // usable after fork) and leaves with `_exit`, running no destructor or exit handler of the
    // parent's state; a panic is caught before it can unwind into the parent's frames.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Ok(());
    }
    if pid == 0 {
        // stdout is `doctor --json`'s answer: a library's chatter during the trial stays out.
        // SAFETY: plain descriptor calls in the child.
        unsafe {
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY);
            if null >= 0 {
                libc::dup2(null, libc::STDOUT_FILENO);
            }
        }
        let code = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(trial)) {
            Ok(()) => 0,
            Err(_) => 101,
        };
        // SAFETY: ends the child without touching the parent's copied state.
        unsafe { libc::_exit(code) }
    }
    let start = Instant::now();
    loop {
        let mut status = 0;
        // SAFETY: waits for our own child without blocking.
        match unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } {
            0 if start.elapsed() < LIMIT => std::thread::sleep(Duration::from_millis(2)),
            0 => {
                // SAFETY: our own child, then reaped.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                    libc::waitpid(pid, &mut status, 0);
                }
                return Err(format!(
                    "loading it did not finish within {} s",
                    LIMIT.as_secs()
                ));
            }
            r if r == pid && libc::WIFSIGNALED(status) => {
                return Err(format!(
                "loading it crashed the process ({}): the file is damaged or is not this library",
                signal_name(libc::WTERMSIG(status))
            ))
            }
            // Exited, or cannot be waited for (SIGCHLD ignored): not a crash.
            _ => return Ok(()),
        }
    }
}

fn signal_name(signal: i32) -> String {
    let name = match signal {
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        _ => return format!("signal {signal}"),
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crash_in_the_trial_is_reported_and_this_process_lives_on() {
        // SAFETY: deliberately the crash a damaged library's initialiser causes.
        let e = survives(|| unsafe { std::ptr::null_mut::<i32>().write_volatile(0) }).unwrap_err();
        assert!(e.contains("SIGSEGV"), "{e}");
        let e = survives(|| std::process::abort()).unwrap_err();
        assert!(e.contains("SIGABRT"), "{e}");
        assert_eq!(survives(|| {}), Ok(()));
        // A panic is the child's own business, not a crash of the load.
        assert_eq!(survives(|| panic!("in the child")), Ok(()));
    }
}
