//! Small files of a restore are written by a few threads beside the unpacker.
//!
//! A node's data directory is mostly small files (a receipt per block). Unpacked one after the
//! other, each costs a create, a write, its mode, mtime and owner and a close, all system time on
//! one thread while the other core waits. Here the unpacker still creates every file itself (so
//! the checks on paths and links see the tree exactly as the stream built it) and reads its bytes;
//! the write and the rest go to a pool. Memory stays bounded: the pool owns a fixed number of
//! buffers, and the unpacker waits for one to come back before it reads the next file.

use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

/// A file's mode, modification time and (when restoring as root) owner.
#[derive(Debug, Clone, Copy)]
pub struct Attrs {
    pub mode: u32,
    pub mtime: u64,
    pub owner: Option<(u32, u32)>,
}

impl Attrs {
    pub fn apply(&self, file: &File) -> std::io::Result<()> {
        file.set_permissions(std::fs::Permissions::from_mode(self.mode))?;
        file.set_modified(unix_time(self.mtime))?;
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::fchown(file, Some(uid), Some(gid))?;
        }
        Ok(())
    }
}

pub fn unix_time(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

/// A file created by the unpacker, with its whole content: the first `len` bytes of `data`.
pub struct Job {
    pub file: File,
    pub path: PathBuf,
    pub data: Vec<u8>,
    pub len: usize,
    pub attrs: Attrs,
}

/// A file written, closed and complete, or why not.
pub type Written = Result<(PathBuf, u64), String>;

pub struct Writers {
    jobs: Option<SyncSender<Job>>,
    /// Each job's buffer comes back with its outcome.
    done: Receiver<(Vec<u8>, Written)>,
    free: Vec<Vec<u8>>,
    buffers: usize,
    threads: Vec<JoinHandle<()>>,
}

impl Writers {
    /// `threads` writers sharing `buffers` buffers.
    pub fn start(threads: usize, buffers: usize) -> Writers {
        let (jobs, queue) = sync_channel::<Job>(buffers);
        let (report, done) = sync_channel(buffers);
        let queue = std::sync::Arc::new(std::sync::Mutex::new(queue));
        let threads = (0..threads)
            .map(|_| {
                let (queue, report) = (queue.clone(), report.clone());
                std::thread::spawn(move || {
                    loop {
                        let job = match queue.lock() {
                            Ok(queue) => queue.recv(),
                            Err(_) => return,
                        };
                        let Ok(job) = job else { return };
                        let (buffer, written) = write(job);
                        if report.send((buffer, written)).is_err() {
                            return;
                        }
                    }
                })
            })
            .collect();
        Writers {
            jobs: Some(jobs),
            done,
            free: (0..buffers).map(|_| Vec::new()).collect(),
            buffers,
            threads,
        }
    }

    /// A buffer for the next file, holding whatever it held before (zeroing it again for every
    /// file was a visible cost). When all are in use, waits for a file to be written; each
    /// finished file goes to `on_written` (and the first failure is returned).
    pub fn buffer(&mut self, on_written: &mut dyn FnMut(PathBuf, u64)) -> Result<Vec<u8>, String> {
        if self.free.is_empty() {
            self.collect_one(on_written)?;
        }
        Ok(self.free.pop().unwrap_or_default())
    }

    pub fn submit(&mut self, job: Job) -> Result<(), String> {
        let sent = self.jobs.as_ref().map(|jobs| jobs.send(job));
        match sent {
            Some(Ok(())) => Ok(()),
            _ => Err("the file writers stopped".to_owned()),
        }
    }

    /// Waits until every submitted file is written.
    pub fn finish(mut self, on_written: &mut dyn FnMut(PathBuf, u64)) -> Result<(), String> {
        while self.free.len() < self.buffers {
            self.collect_one(on_written)?;
        }
        Ok(())
    }

    fn collect_one(&mut self, on_written: &mut dyn FnMut(PathBuf, u64)) -> Result<(), String> {
        let (buffer, written) = self
            .done
            .recv()
            .map_err(|_| "the file writers stopped".to_owned())?;
        self.free.push(buffer);
        let (path, size) = written?;
        on_written(path, size);
        Ok(())
    }
}

/// Closing the queue stops the threads once they have written what they hold (at most one
/// job per buffer, and the report channel has room for each, so none blocks), and they are
/// waited for: nothing reaches the staging directory after the unpack returns.
impl Drop for Writers {
    fn drop(&mut self) {
        self.jobs = None;
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn write(job: Job) -> (Vec<u8>, Written) {
    use std::io::Write;
    let Job {
        mut file,
        path,
        data,
        len,
        attrs,
    } = job;
    let written = file
        .write_all(&data[..len])
        .and_then(|()| attrs.apply(&file))
        .map(|()| len as u64)
        .map_err(|e| format!("{}: {e}", path.display()));
    drop(file);
    (data, written.map(|size| (path, size)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn attrs(mode: u32) -> Attrs {
        Attrs {
            mode,
            mtime: 1_700_000_000,
            owner: None,
        }
    }

    #[test]
    fn every_file_is_written_with_its_attributes_and_reported_once() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut writers = Writers::start(2, 3);
        let mut reported = Vec::new();
        for i in 0..50u32 {
            let mut on_written = |path: PathBuf, size: u64| reported.push((path, size));
            // A reused buffer keeps its old bytes; only the first `len` are this file's.
            let mut buffer = writers.buffer(&mut on_written).expect("buffer");
            let len = (i * 100) as usize;
            buffer.resize(buffer.len().max(len), 0xEE);
            for (n, byte) in buffer[..len].iter_mut().enumerate() {
                *byte = n as u8;
            }
            let path = dir.path().join(format!("f{i}"));
            let file = File::create_new(&path).expect("create");
            writers
                .submit(Job {
                    file,
                    path,
                    data: buffer,
                    len,
                    attrs: attrs(0o640),
                })
                .expect("submit");
        }
        writers
            .finish(&mut |path, size| reported.push((path, size)))
            .expect("finish");
        reported.sort();
        assert_eq!(reported.len(), 50);
        for i in 0..50u32 {
            let path = dir.path().join(format!("f{i}"));
            let expected: Vec<u8> = (0..i * 100).map(|b| b as u8).collect();
            assert_eq!(std::fs::read(&path).expect("read"), expected);
            let meta = std::fs::metadata(&path).expect("metadata");
            assert_eq!((meta.mode() & 0o7777, meta.mtime()), (0o640, 1_700_000_000));
            assert!(reported.contains(&(path, u64::from(i * 100))));
        }
    }

    #[test]
    fn a_failed_write_is_reported_with_its_path() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("read-only");
        std::fs::write(&path, b"").expect("create");
        // Opened for reading only: the write fails.
        let file = File::open(&path).expect("open");
        let mut writers = Writers::start(1, 1);
        let mut data = writers.buffer(&mut |_, _| {}).expect("buffer");
        data.extend_from_slice(b"data");
        writers
            .submit(Job {
                file,
                path: path.clone(),
                data,
                len: 4,
                attrs: attrs(0o644),
            })
            .expect("submit");
        let err = writers.finish(&mut |_, _| {}).expect_err("the write fails");
        assert!(err.starts_with(&format!("{}: ", path.display())), "{err}");
    }
}
