//! The control socket of `tlsaccel sim` (`--control PATH`): faults injected into every device
//! function the server runs, from outside the process that drives them.
//!
//! A vfio-user server gives each connection a device function of its own, so a fault written
//! into the model's BAR0 window by one client reaches only that client's function. A test of
//! the daemon needs the daemon's function to misbehave: it connects here instead. The
//! protocol is one line per command and one line per answer:
//!
//! ```text
//! > stall                      engines hold the jobs they accept until `resume`
//! > resume
//! > drop-completion            the next completion of each function is never written
//! > corrupt-tag                the next seal writes a tag with one bit flipped
//! > corrupt-open-tag           the next open checks a tag with one bit flipped (a good
//! >                            record fails with AUTH_FAILED)
//! > dma-fault                  the next accepted job fails with DMA_FAULT
//! > oversize-length            the next completion claims an impossible result_len
//! > fatal                      every function enters the fatal state
//! > reset                      every function resets itself, as after a firmware restart
//! > functions                  how many functions are live
//! < ok 2                       applied to 2 functions (or: `error <why>`)
//! ```
//!
//! This is part of the reference model only (device-spec §9); a card has no such socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use tlsaccel_driver::abi::{regs, DeviceControl};
use tlsaccel_sim::{Device, Fault};

/// The live device functions of a simulator server.
#[derive(Debug, Clone, Default)]
pub struct Functions(Arc<Mutex<Vec<Weak<Device>>>>);

impl Functions {
    /// Adds a function; it leaves the list when it is dropped.
    pub fn register(&self, device: &Arc<Device>) {
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        all.retain(|d| d.strong_count() > 0);
        all.push(Arc::downgrade(device));
    }

    fn live(&self) -> Vec<Arc<Device>> {
        let all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        all.iter().filter_map(Weak::upgrade).collect()
    }

    /// Carries out one command line on every live function; returns the answer line.
    pub fn command(&self, line: &str) -> String {
        let devices = self.live();
        let action: Box<dyn Fn(&Device)> = match line.trim() {
            "functions" => return format!("ok {}", devices.len()),
            "stall" => Box::new(|d| d.inject(Fault::Stall)),
            "resume" => Box::new(|d| d.inject(Fault::Resume)),
            "drop-completion" => Box::new(|d| d.inject(Fault::DropNextCompletion)),
            "corrupt-tag" => Box::new(|d| d.inject(Fault::CorruptNextTag)),
            "corrupt-open-tag" => Box::new(|d| d.inject(Fault::CorruptNextOpenTag)),
            "dma-fault" => Box::new(|d| d.inject(Fault::DmaFaultNextJob)),
            "oversize-length" => Box::new(|d| d.inject(Fault::OversizeNextResultLength)),
            "fatal" => Box::new(|d| d.inject(Fault::Fatal)),
            "reset" => {
                Box::new(|d| d.bar_write32(regs::DEVICE_CONTROL, DeviceControl::RESET.bits()))
            }
            other => return format!("error unknown command {other:?}"),
        };
        for device in &devices {
            action(device);
        }
        format!("ok {}", devices.len())
    }
}

/// Errors of the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot listen on {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Serves the control socket at `path` on a thread of its own, until the process ends.
pub fn serve(path: &Path, functions: Functions) -> Result<(), ControlError> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(|source| ControlError::Listen {
        path: path.to_owned(),
        source,
    })?;
    std::thread::Builder::new()
        .name("tlsaccel-sim-control".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let functions = functions.clone();
                // One thread per controller: there are few, and they are tests.
                let _ = std::thread::Builder::new()
                    .name("tlsaccel-sim-control-client".into())
                    .spawn(move || answer(stream, &functions));
            }
        })
        .map_err(|source| ControlError::Listen {
            path: path.to_owned(),
            source,
        })?;
    Ok(())
}

fn answer(stream: UnixStream, functions: &Functions) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    // Lines are short commands: a controller sending without end is cut off.
    for line in BufReader::new(std::io::Read::take(stream, 1 << 20)).lines() {
        let Ok(line) = line else {
            return;
        };
        let reply = functions.command(&line);
        tracing::info!(command = line.trim(), %reply, "sim control");
        if writeln!(writer, "{reply}").is_err() {
            return;
        }
    }
}

/// Sends one command to the control socket at `path` and returns the answer line.
pub fn send(path: &Path, command: &str) -> std::io::Result<String> {
    let mut stream = UnixStream::connect(path)?;
    writeln!(stream, "{command}")?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer)?;
    Ok(answer.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tlsaccel_driver::abi::DeviceStatus;
    use tlsaccel_sim::DeviceConfig;

    #[test]
    fn commands_reach_every_live_function_and_unknown_ones_are_refused() {
        let functions = Functions::default();
        let a = Arc::new(Device::new(DeviceConfig::default()).unwrap());
        let b = Arc::new(Device::new(DeviceConfig::default()).unwrap());
        functions.register(&a);
        functions.register(&b);
        assert_eq!(functions.command("functions"), "ok 2");
        assert_eq!(functions.command("fatal"), "ok 2");
        for device in [&a, &b] {
            let status = DeviceStatus::from_bits_retain(device.bar_read32(regs::DEVICE_STATUS));
            assert!(status.contains(DeviceStatus::FATAL));
        }
        drop(b);
        assert_eq!(functions.command("functions"), "ok 1");
        assert!(functions.command("explode").starts_with("error"));
    }

    #[test]
    fn the_socket_answers_each_line() {
        let dir = std::env::temp_dir().join(format!("tlsaccel-ctl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("control.sock");
        let functions = Functions::default();
        let device = Arc::new(Device::new(DeviceConfig::default()).unwrap());
        functions.register(&device);
        serve(&path, functions).unwrap();
        assert_eq!(send(&path, "stall").unwrap(), "ok 1");
        assert_eq!(send(&path, "resume").unwrap(), "ok 1");
        assert!(send(&path, "nonsense").unwrap().starts_with("error"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
