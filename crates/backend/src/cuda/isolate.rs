//! Trying a risky load in a child process first. Loading a library runs its initialisers, and a
//! damaged file, or a library built for something else, can crash there: in-process, that kills
//! flint before doctor says a word. A forked child takes the crash instead, and the library is
//! reported and passed over.

use std::time::{Duration, Instant};

/// Long enough for cuBLASLt (half a gigabyte) from a slow network file system; a load that
/// takes longer is as unusable as one that crashes.
const LIMIT: Duration = Duration::from_secs(60);

/// How long a load may take before flint says it is waiting.
const PATIENCE: Duration = Duration::from_secs(5);

/// The trial child's exit status once the trial is over. It backs up the byte in the pipe,
/// which a library that closes every descriptor as it loads takes away.
const OVER: i32 = 0x5a;

/// Runs `trial` (the loading of `what`) in a forked child and says whether the child survived
/// it: neither killed by a signal nor ended early (a library can call `exit` as it loads). When
/// this process cannot fork, the trial is skipped (`Ok`): the load then happens in-process, as
/// without it.
pub(crate) fn survives(what: &str, trial: impl FnOnce()) -> Result<(), String> {
    // The child writes one byte here once the trial is over: an exit without it was the
    // library's doing.
    let mut done = [0; 2];
    // SAFETY: creates a pipe into the array.
    if unsafe { libc::pipe2(done.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Ok(());
    }
    let [read_end, write_end] = done;
    // SAFETY: the child only runs `trial` (loader calls and allocation, which glibc keeps
    // usable after fork) and leaves with `_exit`, running no destructor or exit handler of the
    // parent's state; a panic is caught before it can unwind into the parent's frames.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: plain process and descriptor calls in the child.
        unsafe {
            // A child left hanging ends with flint, whatever ends flint.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            // A library's chatter during the trial is left out: a good library says it again
            // when flint loads it, and a bad one is reported.
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY);
            if null >= 0 {
                libc::dup2(null, libc::STDOUT_FILENO);
                libc::dup2(null, libc::STDERR_FILENO);
            }
        }
        // A panic is the trial's own failure, not the library's: it reports as over.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(trial));
        // SAFETY: one byte from a live array; then the child ends without touching the
        // parent's copied state.
        unsafe {
            libc::write(write_end, [1u8].as_ptr().cast(), 1);
            libc::_exit(OVER)
        }
    }
    // SAFETY: our own descriptor; the child holds its copy.
    unsafe { libc::close(write_end) };
    let verdict = if pid < 0 {
        Ok(())
    } else {
        wait(what, pid, read_end)
    };
    // SAFETY: our own descriptor, no longer used.
    unsafe { libc::close(read_end) };
    verdict
}

/// Waits (at most [`LIMIT`]) for the trial child `pid`, and reads its verdict.
fn wait(what: &str, pid: libc::pid_t, done: libc::c_int) -> Result<(), String> {
    let start = Instant::now();
    let mut status = 0;
    let mut told = false;
    loop {
        // SAFETY: waits for our own child without blocking.
        match unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } {
            0 if start.elapsed() < LIMIT => {
                // A silent wait of up to a minute would look like a hang.
                if !told && start.elapsed() > PATIENCE {
                    super::note(&format!(
                        "{what} is slow to load; a library that has not loaded within {} s is passed over",
                        LIMIT.as_secs()
                    ));
                    told = true;
                }
                std::thread::sleep(Duration::from_millis(2))
            }
            0 => {
                // SAFETY: our own child, then reaped.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                    libc::waitpid(pid, &mut status, 0);
                }
                return Err(format!(
                    "its initialisers did not finish within {} s",
                    LIMIT.as_secs()
                ));
            }
            r if r == pid => break,
            _ if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) => {}
            // Reaped by someone else (SIGCHLD ignored, as a parent process or a library may
            // set it, or a handler that waits): the pipe alone says whether the trial ended.
            _ if over(done) => return Ok(()),
            _ => {
                return Err(
                    "its initialisers ended the process (a crash or an exit); the file is \
                            damaged or is not this library"
                        .into(),
                )
            }
        }
    }
    if libc::WIFSIGNALED(status) {
        return Err(format!(
            "its initialisers crashed the process ({}); the file is damaged or is not this library",
            signal_name(libc::WTERMSIG(status))
        ));
    }
    if over(done) || (libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == OVER) {
        return Ok(());
    }
    Err(format!(
        "its initialisers ended the process (exit status {}); it is not this library",
        libc::WEXITSTATUS(status)
    ))
}

/// Whether the trial child wrote its byte.
fn over(done: libc::c_int) -> bool {
    let mut byte = 0u8;
    // SAFETY: reads at most one byte into a live variable; the pipe does not block.
    unsafe { libc::read(done, (&mut byte as *mut u8).cast(), 1) == 1 }
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
        let e = survives("test", || unsafe {
            std::ptr::null_mut::<i32>().write_volatile(0)
        })
        .unwrap_err();
        assert!(e.contains("SIGSEGV"), "{e}");
        let e = survives("test", || std::process::abort()).unwrap_err();
        assert!(e.contains("SIGABRT"), "{e}");
        assert_eq!(survives("test", || {}), Ok(()));
        // A panic is the child's own business, not a crash of the load.
        assert_eq!(survives("test", || panic!("in the child")), Ok(()));
        // A library that ends the process as it loads would end flint.
        let e = survives("test", || std::process::exit(0)).unwrap_err();
        assert!(e.contains("ended the process (exit status 0)"), "{e}");
        // One that closes every descriptor (the pipe included) has still loaded.
        assert_eq!(
            survives("test", || {
                for fd in 3..1024 {
                    // SAFETY: the child's own copies of the descriptors.
                    unsafe { libc::close(fd) };
                }
            }),
            Ok(())
        );
    }
}
