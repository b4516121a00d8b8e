//! The SFTP server behind `remote-agent sftp-server` (protocol version 3, the dialect OpenSSH's
//! `sftp` and `scp` speak, plus the common `@openssh.com` extensions). It owns the request
//! handler (open handles, file, directory and attribute operations) and the stdin/stdout session.
//! The process already runs as the right OS user, so it only makes plain filesystem calls.

use std::collections::HashMap;
use std::fs::{self, DirBuilder, File, FileTimes, Metadata, OpenOptions, Permissions, ReadDir};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use russh_sftp::protocol::{
    Attrs, Data, ExtendedReply, File as NameEntry, FileAttributes, Handle, Name, OpenFlags, Packet,
    Status, StatusCode, Version,
};
use russh_sftp::server::{Config, Handler, StatusReply};
use tokio::io::{AsyncRead, AsyncWrite, BufReader, ReadBuf};
use tokio::sync::oneshot;
use tracing::{debug, trace};

/// Largest request packet accepted (and advertised through `limits@openssh.com`), as OpenSSH.
const MAX_PACKET_LEN: u32 = 256 * 1024;
/// Largest read or write payload: a packet minus room for its header, as OpenSSH.
const MAX_IO_LEN: u32 = MAX_PACKET_LEN - 1024;
/// Open file and directory handles allowed per session.
const MAX_HANDLES: usize = 512;
/// Directory entries returned per `SSH_FXP_READDIR` reply.
const READDIR_BATCH: usize = 100;

/// Extensions announced in `SSH_FXP_VERSION` (name, revision); all handled by `extended`.
const EXTENSIONS: [(&str, &str); 6] = [
    ("posix-rename@openssh.com", "1"),
    ("statvfs@openssh.com", "2"),
    ("fstatvfs@openssh.com", "2"),
    ("hardlink@openssh.com", "1"),
    ("fsync@openssh.com", "1"),
    ("limits@openssh.com", "1"),
];

/// Serve SFTP on this process's stdin/stdout until the client closes the stream.
pub async fn serve_stdio() -> io::Result<()> {
    let stdin = BufReader::with_capacity(MAX_PACKET_LEN as usize, tokio::io::stdin());
    serve(stdin, tokio::io::stdout()).await
}

/// Serve SFTP on `reader`/`writer` until the peer closes `reader` (or the stream breaks).
pub async fn serve<R, W>(reader: R, writer: W) -> io::Result<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (done_tx, done_rx) = oneshot::channel();
    let stream = SessionStream {
        reader,
        writer,
        framing: Framing::default(),
        closed: false,
        error: None,
        done: Some(done_tx),
    };
    let config = Config {
        max_client_packet_len: MAX_PACKET_LEN,
    };
    // `run_with_config` spawns the session loop and returns at once. The loop owns `stream`
    // and drops it when it ends (at end of input), which is when `done_rx` resolves.
    russh_sftp::server::run_with_config(stream, SftpHandler::default(), config).await;
    let outcome = done_rx.await.unwrap_or(None);
    debug!("sftp session ended");
    match outcome {
        Some(err) => Err(err),
        None => Ok(()),
    }
}

/// The byte stream handed to russh-sftp. It reports the end of the session through `done` when
/// dropped, and turns anything after which the session cannot continue (a read or write error,
/// a packet longer than allowed) into end of input, so that russh-sftp's loop ends.
struct SessionStream<R, W> {
    reader: R,
    writer: W,
    framing: Framing,
    /// Set once the session must end: reads report end of input from then on.
    closed: bool,
    /// The first error that ended the session (a vanished peer is not an error).
    error: Option<io::Error>,
    done: Option<oneshot::Sender<Option<io::Error>>>,
}

impl<R, W> SessionStream<R, W> {
    fn fail(&mut self, err: io::Error) {
        self.closed = true;
        if self.error.is_none() && err.kind() != io::ErrorKind::BrokenPipe {
            self.error = Some(err);
        }
    }

    /// Records a write-side error and hands back an equivalent one for the caller.
    fn fail_write(&mut self, err: io::Error) -> io::Error {
        let copy = io::Error::new(err.kind(), err.to_string());
        self.fail(err);
        copy
    }
}

impl<R, W> Drop for SessionStream<R, W> {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            let _ = done.send(self.error.take());
        }
    }
}

impl<R: AsyncRead + Unpin, W: Unpin> AsyncRead for SessionStream<R, W> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.closed {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.reader).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if let Err(err) = this.framing.feed(&buf.filled()[before..]) {
                    this.fail(err);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(err)) => {
                this.fail(err);
                Poll::Ready(Ok(()))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<R: Unpin, W: AsyncWrite + Unpin> AsyncWrite for SessionStream<R, W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.writer).poll_write(cx, buf) {
            Poll::Ready(Err(err)) => Poll::Ready(Err(this.fail_write(err))),
            other => other,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.writer).poll_flush(cx) {
            Poll::Ready(Err(err)) => Poll::Ready(Err(this.fail_write(err))),
            other => other,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.writer).poll_shutdown(cx) {
            Poll::Ready(Err(err)) => Poll::Ready(Err(this.fail_write(err))),
            other => other,
        }
    }
}

/// Follows the packet framing of the input (u32 length, then that many bytes) to spot a packet
/// longer than allowed. russh-sftp rejects such a packet without skipping its body, so the
/// stream is out of step from then on; like OpenSSH's sftp-server we end the session instead.
#[derive(Default)]
struct Framing {
    header: [u8; 4],
    header_len: usize,
    body_left: usize,
}

impl Framing {
    fn feed(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            if self.body_left > 0 {
                let n = self.body_left.min(data.len());
                self.body_left -= n;
                data = &data[n..];
                continue;
            }
            let n = (self.header.len() - self.header_len).min(data.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&data[..n]);
            self.header_len += n;
            data = &data[n..];
            if self.header_len == self.header.len() {
                self.header_len = 0;
                let len = u32::from_be_bytes(self.header);
                if len > MAX_PACKET_LEN {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "sftp packet of {len} bytes exceeds the {MAX_PACKET_LEN}-byte limit"
                        ),
                    ));
                }
                self.body_left = len as usize;
            }
        }
        Ok(())
    }
}

/// An open handle.
enum OpenHandle {
    File { path: String, file: Arc<File> },
    Dir(Arc<Mutex<DirState>>),
}

/// A directory being listed.
struct DirState {
    path: PathBuf,
    entries: ReadDir,
    /// "." and ".." (which `ReadDir` omits) still have to be sent, as OpenSSH lists them.
    dots_pending: bool,
    finished: bool,
}

/// What a handle refers to, for the operations that accept both kinds.
enum Target {
    File(Arc<File>),
    Dir(PathBuf),
}

/// User and group names for `longname`, looked up once per id.
#[derive(Default)]
struct OwnerNames {
    users: HashMap<u32, String>,
    groups: HashMap<u32, String>,
}

impl OwnerNames {
    fn user(&mut self, uid: u32) -> &str {
        self.users.entry(uid).or_insert_with(|| {
            match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
                Ok(Some(user)) => user.name,
                _ => uid.to_string(),
            }
        })
    }

    fn group(&mut self, gid: u32) -> &str {
        self.groups.entry(gid).or_insert_with(|| {
            match nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid)) {
                Ok(Some(group)) => group.name,
                _ => gid.to_string(),
            }
        })
    }
}

/// The per-session request handler: one per `sftp-server` process.
struct SftpHandler {
    handles: HashMap<String, OpenHandle>,
    next_handle: u64,
    max_handles: usize,
    owners: Arc<Mutex<OwnerNames>>,
}

impl Default for SftpHandler {
    fn default() -> Self {
        Self {
            handles: HashMap::new(),
            next_handle: 0,
            max_handles: MAX_HANDLES,
            owners: Arc::default(),
        }
    }
}

impl SftpHandler {
    fn ensure_handle_room(&self) -> Result<(), StatusReply> {
        if self.handles.len() >= self.max_handles {
            return Err(StatusCode::Failure.with_message("too many open handles"));
        }
        Ok(())
    }

    fn add_handle(&mut self, handle: OpenHandle) -> String {
        self.next_handle += 1;
        let name = self.next_handle.to_string();
        self.handles.insert(name.clone(), handle);
        name
    }

    fn file(&self, handle: &str) -> Result<Arc<File>, StatusReply> {
        match self.handles.get(handle) {
            Some(OpenHandle::File { file, .. }) => Ok(file.clone()),
            _ => Err(invalid_handle()),
        }
    }

    fn target(&self, handle: &str) -> Result<Target, StatusReply> {
        match self.handles.get(handle) {
            Some(OpenHandle::File { file, .. }) => Ok(Target::File(file.clone())),
            Some(OpenHandle::Dir(dir)) => {
                let dir = dir.lock().map_err(|_| poisoned())?;
                Ok(Target::Dir(dir.path.clone()))
            }
            None => Err(invalid_handle()),
        }
    }
}

impl Handler for SftpHandler {
    type Error = StatusReply;

    fn unimplemented(&self) -> Self::Error {
        StatusCode::OpUnsupported.with_message("operation not supported")
    }

    async fn init(
        &mut self,
        version: u32,
        extensions: HashMap<String, String>,
    ) -> Result<Version, Self::Error> {
        debug!(client_version = version, ?extensions, "sftp init");
        let extensions = EXTENSIONS
            .iter()
            .map(|&(name, revision)| (name.to_owned(), revision.to_owned()))
            .collect();
        Ok(Version {
            version: russh_sftp::protocol::VERSION,
            extensions,
        })
    }

    async fn open(
        &mut self,
        id: u32,
        filename: String,
        pflags: OpenFlags,
        attrs: FileAttributes,
    ) -> Result<Handle, Self::Error> {
        self.ensure_handle_room()?;
        debug!(path = %filename, flags = pflags.bits(), "sftp open");
        let mode = attrs.permissions.map_or(0o666, |perm| perm & 0o7777);
        let options = open_options(pflags, mode);
        let path = filename.clone();
        let file = blocking(move || options.open(path)).await?;
        let handle = self.add_handle(OpenHandle::File {
            path: filename,
            file: Arc::new(file),
        });
        Ok(Handle { id, handle })
    }

    async fn close(&mut self, id: u32, handle: String) -> Result<Status, Self::Error> {
        match self.handles.remove(&handle) {
            Some(OpenHandle::File { path, file }) => {
                debug!(%path, "sftp close");
                // close(2) can block (e.g. flushing to NFS): do it off the async threads.
                blocking(move || {
                    drop(file);
                    Ok(())
                })
                .await?;
            }
            Some(OpenHandle::Dir(_)) => debug!("sftp closedir"),
            None => return Err(invalid_handle()),
        }
        Ok(ok_status(id))
    }

    async fn read(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        len: u32,
    ) -> Result<Data, Self::Error> {
        let file = self.file(&handle)?;
        let len = len.min(MAX_IO_LEN) as usize;
        trace!(%handle, offset, len, "sftp read");
        let data = blocking(move || read_at(&file, offset, len)).await?;
        if data.is_empty() && len > 0 {
            return Err(StatusCode::Eof.with_message("End of file"));
        }
        Ok(Data { id, data })
    }

    async fn write(
        &mut self,
        id: u32,
        handle: String,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<Status, Self::Error> {
        let file = self.file(&handle)?;
        trace!(%handle, offset, len = data.len(), "sftp write");
        blocking(move || file.write_all_at(&data, offset)).await?;
        Ok(ok_status(id))
    }

    async fn lstat(&mut self, id: u32, path: String) -> Result<Attrs, Self::Error> {
        debug!(%path, "sftp lstat");
        let metadata = blocking(move || fs::symlink_metadata(path)).await?;
        Ok(Attrs {
            id,
            attrs: attrs_from_metadata(&metadata),
        })
    }

    async fn fstat(&mut self, id: u32, handle: String) -> Result<Attrs, Self::Error> {
        let target = self.target(&handle)?;
        debug!(%handle, "sftp fstat");
        let metadata = blocking(move || match target {
            Target::File(file) => file.metadata(),
            Target::Dir(path) => fs::metadata(path),
        })
        .await?;
        Ok(Attrs {
            id,
            attrs: attrs_from_metadata(&metadata),
        })
    }

    async fn setstat(
        &mut self,
        id: u32,
        path: String,
        attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        debug!(%path, ?attrs, "sftp setstat");
        blocking(move || set_path_attrs(Path::new(&path), &attrs)).await?;
        Ok(ok_status(id))
    }

    async fn fsetstat(
        &mut self,
        id: u32,
        handle: String,
        attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        let target = self.target(&handle)?;
        debug!(%handle, ?attrs, "sftp fsetstat");
        blocking(move || match target {
            Target::File(file) => set_file_attrs(&file, &attrs),
            Target::Dir(path) => set_path_attrs(&path, &attrs),
        })
        .await?;
        Ok(ok_status(id))
    }

    async fn opendir(&mut self, id: u32, path: String) -> Result<Handle, Self::Error> {
        self.ensure_handle_room()?;
        debug!(%path, "sftp opendir");
        let path = PathBuf::from(path);
        let dir = path.clone();
        let entries = blocking(move || fs::read_dir(dir)).await?;
        let state = DirState {
            path,
            entries,
            dots_pending: true,
            finished: false,
        };
        let handle = self.add_handle(OpenHandle::Dir(Arc::new(Mutex::new(state))));
        Ok(Handle { id, handle })
    }

    async fn readdir(&mut self, id: u32, handle: String) -> Result<Name, Self::Error> {
        let Some(OpenHandle::Dir(state)) = self.handles.get(&handle) else {
            return Err(invalid_handle());
        };
        let state = state.clone();
        let owners = self.owners.clone();
        trace!(%handle, "sftp readdir");
        let files = blocking(move || read_dir_batch(&state, &owners)).await?;
        if files.is_empty() {
            return Err(StatusCode::Eof.with_message("End of file"));
        }
        Ok(Name { id, files })
    }

    async fn remove(&mut self, id: u32, filename: String) -> Result<Status, Self::Error> {
        debug!(path = %filename, "sftp remove");
        blocking(move || fs::remove_file(filename)).await?;
        Ok(ok_status(id))
    }

    async fn mkdir(
        &mut self,
        id: u32,
        path: String,
        attrs: FileAttributes,
    ) -> Result<Status, Self::Error> {
        debug!(%path, "sftp mkdir");
        let mode = attrs.permissions.map_or(0o777, |perm| perm & 0o7777);
        blocking(move || DirBuilder::new().mode(mode).create(path)).await?;
        Ok(ok_status(id))
    }

    async fn rmdir(&mut self, id: u32, path: String) -> Result<Status, Self::Error> {
        debug!(%path, "sftp rmdir");
        blocking(move || fs::remove_dir(path)).await?;
        Ok(ok_status(id))
    }

    async fn realpath(&mut self, id: u32, path: String) -> Result<Name, Self::Error> {
        let resolved = blocking({
            let path = path.clone();
            move || resolve_path(&path)
        })
        .await?;
        let resolved = resolved.to_string_lossy().into_owned();
        debug!(%path, %resolved, "sftp realpath");
        Ok(Name {
            id,
            files: vec![NameEntry {
                filename: resolved.clone(),
                longname: resolved,
                attrs: FileAttributes::empty(),
            }],
        })
    }

    async fn stat(&mut self, id: u32, path: String) -> Result<Attrs, Self::Error> {
        debug!(%path, "sftp stat");
        let metadata = blocking(move || fs::metadata(path)).await?;
        Ok(Attrs {
            id,
            attrs: attrs_from_metadata(&metadata),
        })
    }

    async fn rename(
        &mut self,
        id: u32,
        oldpath: String,
        newpath: String,
    ) -> Result<Status, Self::Error> {
        debug!(%oldpath, %newpath, "sftp rename");
        blocking(move || rename_no_replace(Path::new(&oldpath), Path::new(&newpath))).await?;
        Ok(ok_status(id))
    }

    async fn readlink(&mut self, id: u32, path: String) -> Result<Name, Self::Error> {
        debug!(%path, "sftp readlink");
        let target = blocking(move || fs::read_link(path)).await?;
        let target = target.to_string_lossy().into_owned();
        Ok(Name {
            id,
            files: vec![NameEntry {
                filename: target.clone(),
                longname: target,
                attrs: FileAttributes::empty(),
            }],
        })
    }

    /// `SSH_FXP_SYMLINK`. The draft orders the fields (linkpath, targetpath) and russh-sftp names
    /// them so, but OpenSSH's client and server have always used the reverse order: the first
    /// field is what the link points to, the second is the link to create. We do as OpenSSH does.
    async fn symlink(
        &mut self,
        id: u32,
        target: String,
        link: String,
    ) -> Result<Status, Self::Error> {
        debug!(%target, %link, "sftp symlink");
        blocking(move || std::os::unix::fs::symlink(target, link)).await?;
        Ok(ok_status(id))
    }

    async fn extended(
        &mut self,
        id: u32,
        request: String,
        data: Vec<u8>,
    ) -> Result<Packet, Self::Error> {
        debug!(%request, "sftp extended");
        let mut args = WireReader(&data);
        match request.as_str() {
            "posix-rename@openssh.com" => {
                let (oldpath, newpath) = (args.string()?, args.string()?);
                debug!(%oldpath, %newpath, "sftp posix-rename");
                blocking(move || fs::rename(oldpath, newpath)).await?;
                Ok(ok_status(id).into())
            }
            "hardlink@openssh.com" => {
                let (oldpath, newpath) = (args.string()?, args.string()?);
                debug!(%oldpath, %newpath, "sftp hardlink");
                blocking(move || fs::hard_link(oldpath, newpath)).await?;
                Ok(ok_status(id).into())
            }
            "statvfs@openssh.com" => {
                let path = args.string()?;
                let stats =
                    blocking(move || Ok(nix::sys::statvfs::statvfs(path.as_str())?)).await?;
                Ok(ExtendedReply {
                    id,
                    data: encode_statvfs(&stats),
                }
                .into())
            }
            "fstatvfs@openssh.com" => {
                let target = self.target(&args.string()?)?;
                let stats = blocking(move || {
                    Ok(match target {
                        Target::File(file) => nix::sys::statvfs::fstatvfs(&*file)?,
                        Target::Dir(path) => nix::sys::statvfs::statvfs(&path)?,
                    })
                })
                .await?;
                Ok(ExtendedReply {
                    id,
                    data: encode_statvfs(&stats),
                }
                .into())
            }
            "fsync@openssh.com" => {
                let file = self.file(&args.string()?)?;
                blocking(move || file.sync_all()).await?;
                Ok(ok_status(id).into())
            }
            "limits@openssh.com" => {
                let limits = [
                    u64::from(MAX_PACKET_LEN),
                    u64::from(MAX_IO_LEN),
                    u64::from(MAX_IO_LEN),
                    self.max_handles as u64,
                ];
                Ok(ExtendedReply {
                    id,
                    data: limits.iter().flat_map(|v| v.to_be_bytes()).collect(),
                }
                .into())
            }
            _ => Err(StatusCode::OpUnsupported
                .with_message(format!("unsupported extended request \"{request}\""))),
        }
    }
}

/// Runs blocking filesystem work off the async threads, mapping its error to an SFTP status.
async fn blocking<T, F>(work: F) -> Result<T, StatusReply>
where
    F: FnOnce() -> io::Result<T> + Send + 'static,
    T: Send + 'static,
{
    match tokio::task::spawn_blocking(work).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) => Err(status_from_io(&err)),
        Err(err) => Err(StatusCode::Failure.with_message(format!("internal error: {err}"))),
    }
}

/// Maps an I/O error to the SFTP status a client expects for it.
fn status_from_io(err: &io::Error) -> StatusReply {
    let code = match err.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory => StatusCode::NoSuchFile,
        io::ErrorKind::PermissionDenied => StatusCode::PermissionDenied,
        _ => StatusCode::Failure,
    };
    let message = match err.raw_os_error() {
        Some(errno) => nix::errno::Errno::from_raw(errno).desc().to_owned(),
        None => err.to_string(),
    };
    code.with_message(message)
}

fn invalid_handle() -> StatusReply {
    StatusCode::Failure.with_message("invalid handle")
}

fn poisoned() -> StatusReply {
    StatusCode::Failure.with_message("handle unusable after an internal error")
}

fn ok_status(id: u32) -> Status {
    Status {
        id,
        status_code: StatusCode::Ok,
        error_message: "Success".to_owned(),
        language_tag: "en-US".to_owned(),
    }
}

/// `open(2)` options for SFTP open flags, with OpenSSH's semantics: no access flag means
/// read-only, and CREATE/EXCLUDE/TRUNCATE go straight to the kernel (bypassing std's checks,
/// which e.g. refuse TRUNCATE without WRITE). `mode` is reduced by the umask as usual.
fn open_options(pflags: OpenFlags, mode: u32) -> OpenOptions {
    let read = pflags.contains(OpenFlags::READ);
    let write = pflags.contains(OpenFlags::WRITE);
    let append = pflags.contains(OpenFlags::APPEND);
    let mut creation = 0;
    if pflags.contains(OpenFlags::CREATE) {
        creation |= libc::O_CREAT;
        if pflags.contains(OpenFlags::EXCLUDE) {
            creation |= libc::O_EXCL;
        }
    }
    if pflags.contains(OpenFlags::TRUNCATE) {
        creation |= libc::O_TRUNC;
    }
    let mut options = OpenOptions::new();
    options
        .read(read || !(write || append))
        .write(write)
        .append(append)
        .custom_flags(creation | libc::O_NOCTTY)
        .mode(mode);
    options
}

/// One positioned read of up to `len` bytes; empty at end of file.
fn read_at(file: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0; len];
    loop {
        match file.read_at(&mut buf, offset) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
}

/// SFTP attributes for `metadata`, with the full `st_mode` (file type bits included).
fn attrs_from_metadata(metadata: &Metadata) -> FileAttributes {
    FileAttributes {
        size: Some(metadata.size()),
        uid: Some(metadata.uid()),
        user: None,
        gid: Some(metadata.gid()),
        group: None,
        permissions: Some(metadata.mode()),
        atime: Some(wire_time(metadata.atime())),
        mtime: Some(wire_time(metadata.mtime())),
    }
}

/// SFTPv3 times are unsigned 32-bit seconds since the epoch.
fn wire_time(secs: i64) -> u32 {
    u32::try_from(secs.max(0)).unwrap_or(u32::MAX)
}

/// Applies `attrs` to `path` (following symlinks), in OpenSSH's order.
fn set_path_attrs(path: &Path, attrs: &FileAttributes) -> io::Result<()> {
    if let Some(size) = attrs.size {
        let size =
            libc::off_t::try_from(size).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        nix::unistd::truncate(path, size)?;
    }
    if let Some(perm) = attrs.permissions {
        fs::set_permissions(path, Permissions::from_mode(perm & 0o7777))?;
    }
    if let (Some(atime), Some(mtime)) = (attrs.atime, attrs.mtime) {
        let atime = nix::sys::time::TimeVal::new(atime as libc::time_t, 0);
        let mtime = nix::sys::time::TimeVal::new(mtime as libc::time_t, 0);
        nix::sys::stat::utimes(path, &atime, &mtime)?;
    }
    if let (Some(uid), Some(gid)) = (attrs.uid, attrs.gid) {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
    }
    Ok(())
}

/// Applies `attrs` to an open file, in OpenSSH's order.
fn set_file_attrs(file: &File, attrs: &FileAttributes) -> io::Result<()> {
    if let Some(size) = attrs.size {
        file.set_len(size)?;
    }
    if let Some(perm) = attrs.permissions {
        file.set_permissions(Permissions::from_mode(perm & 0o7777))?;
    }
    if let (Some(atime), Some(mtime)) = (attrs.atime, attrs.mtime) {
        let at = |secs: u32| UNIX_EPOCH + Duration::from_secs(secs.into());
        file.set_times(
            FileTimes::new()
                .set_accessed(at(atime))
                .set_modified(at(mtime)),
        )?;
    }
    if let (Some(uid), Some(gid)) = (attrs.uid, attrs.gid) {
        std::os::unix::fs::fchown(file, Some(uid), Some(gid))?;
    }
    Ok(())
}

/// The next batch of a directory listing; empty once the listing is complete.
fn read_dir_batch(
    state: &Mutex<DirState>,
    owners: &Mutex<OwnerNames>,
) -> io::Result<Vec<NameEntry>> {
    let mut state = state
        .lock()
        .map_err(|_| io::Error::other("directory handle poisoned"))?;
    let mut found: Vec<(String, Metadata)> = Vec::new();
    if state.dots_pending {
        state.dots_pending = false;
        for dot in [".", ".."] {
            if let Ok(metadata) = fs::symlink_metadata(state.path.join(dot)) {
                found.push((dot.to_owned(), metadata));
            }
        }
    }
    while !state.finished && found.len() < READDIR_BATCH {
        match state.entries.next() {
            None => state.finished = true,
            // Like OpenSSH, skip entries that cannot be lstat'ed (e.g. removed meanwhile).
            Some(Ok(entry)) => {
                if let Ok(metadata) = entry.metadata() {
                    found.push((entry.file_name().to_string_lossy().into_owned(), metadata));
                }
            }
            Some(Err(err)) => {
                state.finished = true;
                if found.is_empty() {
                    return Err(err);
                }
            }
        }
    }
    drop(state);

    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let mut owners = owners
        .lock()
        .map_err(|_| io::Error::other("name cache poisoned"))?;
    Ok(found
        .into_iter()
        .map(|(name, metadata)| NameEntry {
            longname: long_name(&name, &metadata, &mut owners, now),
            attrs: attrs_from_metadata(&metadata),
            filename: name,
        })
        .collect())
}

/// An `ls -l` line as OpenSSH's sftp-server writes it (`ls_file()` in sftp-common.c); the
/// OpenSSH client prints it verbatim for `ls -l`.
fn long_name(name: &str, metadata: &Metadata, owners: &mut OwnerNames, now: i64) -> String {
    let user = owners.user(metadata.uid()).to_owned();
    let group = owners.group(metadata.gid());
    format!(
        "{} {:>3} {:<8} {:<8} {:>8} {} {}",
        mode_string(metadata.mode()),
        metadata.nlink(),
        user,
        group,
        metadata.size(),
        time_string(metadata.mtime(), now),
        name
    )
}

/// `strmode(3)`: type character, nine permission characters and a trailing space.
fn mode_string(mode: u32) -> String {
    let kind = match mode & 0o170000 {
        0o040000 => 'd',
        0o120000 => 'l',
        0o020000 => 'c',
        0o060000 => 'b',
        0o010000 => 'p',
        0o140000 => 's',
        0o100000 => '-',
        _ => '?',
    };
    let flag = |bit: u32, c: char| if mode & bit != 0 { c } else { '-' };
    let exec = |bit: u32, special: u32, with_x: char, without_x: char| match (
        mode & bit != 0,
        mode & special != 0,
    ) {
        (true, true) => with_x,
        (false, true) => without_x,
        (true, false) => 'x',
        (false, false) => '-',
    };
    [
        kind,
        flag(0o400, 'r'),
        flag(0o200, 'w'),
        exec(0o100, 0o4000, 's', 'S'),
        flag(0o040, 'r'),
        flag(0o020, 'w'),
        exec(0o010, 0o2000, 's', 'S'),
        flag(0o004, 'r'),
        flag(0o002, 'w'),
        exec(0o001, 0o1000, 't', 'T'),
        ' ',
    ]
    .into_iter()
    .collect()
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// The time column of `ls -l` in local time: "%b %e %H:%M" within the last six months,
/// "%b %e  %Y" otherwise (as OpenSSH's `ls_file()`).
fn time_string(mtime: i64, now: i64) -> String {
    let Some(tm) = local_time(mtime) else {
        return String::new();
    };
    let month = usize::try_from(tm.tm_mon)
        .ok()
        .and_then(|m| MONTHS.get(m))
        .copied()
        .unwrap_or("???");
    let recent = now - 365 * 24 * 60 * 60 / 2 < mtime && now >= mtime;
    if recent {
        format!(
            "{month} {:>2} {:02}:{:02}",
            tm.tm_mday, tm.tm_hour, tm.tm_min
        )
    } else {
        format!(
            "{month} {:>2}  {}",
            tm.tm_mday,
            i64::from(tm.tm_year) + 1900
        )
    }
}

fn local_time(secs: i64) -> Option<libc::tm> {
    let secs = libc::time_t::try_from(secs).ok()?;
    // SAFETY: `libc::tm` is plain data for which all-zero bytes are a valid value (the
    // `tm_zone` pointer becomes null); `localtime_r` only reads `secs` and writes `tm`.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the duration of the call.
    let result = unsafe { libc::localtime_r(&secs, &mut tm) };
    (!result.is_null()).then_some(tm)
}

/// `SSH_FXP_REALPATH`: the canonical absolute path. As in OpenSSH, "" means the current
/// directory and a path that does not exist (yet) is still resolved: its existing parent is
/// canonicalised, or failing that the path is normalised lexically.
fn resolve_path(path: &str) -> io::Result<PathBuf> {
    let path = if path.is_empty() { "." } else { path };
    match fs::canonicalize(path) {
        Ok(resolved) => Ok(resolved),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            let lexical = normalize_lexically(&std::env::current_dir()?.join(path));
            if let (Some(parent), Some(name)) = (lexical.parent(), lexical.file_name())
                && let Ok(parent) = fs::canonicalize(parent)
            {
                return Ok(parent.join(name));
            }
            Ok(lexical)
        }
        Err(err) => Err(err),
    }
}

/// Removes "." and ".." from an absolute path without touching the filesystem.
fn normalize_lexically(path: &Path) -> PathBuf {
    let mut normal = PathBuf::from("/");
    for component in path.components() {
        match component {
            Component::Normal(part) => normal.push(part),
            Component::ParentDir => {
                normal.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    normal
}

/// SFTPv3 `SSH_FXP_RENAME`, which must fail if `new` exists. Done as OpenSSH does: a regular
/// file is hard-linked to the new name (which fails if it exists) and then unlinked; where
/// hard links are not possible, and for other file types, check for `new` and then rename.
fn rename_no_replace(old: &Path, new: &Path) -> io::Result<()> {
    let metadata = fs::symlink_metadata(old)?;
    if metadata.is_file() {
        match fs::hard_link(old, new) {
            Ok(()) => {
                if let Err(err) = fs::remove_file(old) {
                    let _ = fs::remove_file(new);
                    return Err(err);
                }
                return Ok(());
            }
            Err(err)
                if !matches!(
                    err.raw_os_error(),
                    Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EXDEV | libc::EPERM)
                ) =>
            {
                return Err(err);
            }
            Err(_) => {}
        }
    }
    if fs::symlink_metadata(new).is_ok() {
        return Err(io::Error::from_raw_os_error(libc::EEXIST));
    }
    fs::rename(old, new)
}

/// The `statvfs@openssh.com` reply body: eleven u64 fields.
fn encode_statvfs(stats: &nix::sys::statvfs::Statvfs) -> Vec<u8> {
    use nix::sys::statvfs::FsFlags;
    let mut flags = 0u64;
    if stats.flags().contains(FsFlags::ST_RDONLY) {
        flags |= 1;
    }
    if stats.flags().contains(FsFlags::ST_NOSUID) {
        flags |= 2;
    }
    // The field types differ between platforms (`c_ulong`, `fsblkcnt_t`, ...).
    fn wide(value: impl Into<u64>) -> u64 {
        value.into()
    }
    let fields = [
        wide(stats.block_size()),
        wide(stats.fragment_size()),
        wide(stats.blocks()),
        wide(stats.blocks_free()),
        wide(stats.blocks_available()),
        wide(stats.files()),
        wide(stats.files_free()),
        wide(stats.files_available()),
        wide(stats.filesystem_id()),
        flags,
        wide(stats.name_max()),
    ];
    fields.iter().flat_map(|v| v.to_be_bytes()).collect()
}

/// Reads SFTP wire strings from an extended request's body.
struct WireReader<'a>(&'a [u8]);

impl WireReader<'_> {
    fn string(&mut self) -> Result<String, StatusReply> {
        let bad = || StatusCode::BadMessage.with_message("malformed extended request");
        let (len, rest) = self.0.split_first_chunk::<4>().ok_or_else(bad)?;
        let len = usize::try_from(u32::from_be_bytes(*len)).map_err(|_| bad())?;
        let (value, rest) = rest.split_at_checked(len).ok_or_else(bad)?;
        self.0 = rest;
        String::from_utf8(value.to_vec()).map_err(|_| bad())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn path_str(path: &Path) -> String {
        path.to_str().expect("test paths are UTF-8").to_owned()
    }

    fn perms(mode: u32) -> FileAttributes {
        FileAttributes {
            permissions: Some(mode),
            ..FileAttributes::empty()
        }
    }

    async fn open(handler: &mut SftpHandler, path: &Path, flags: OpenFlags) -> String {
        handler
            .open(1, path_str(path), flags, FileAttributes::empty())
            .await
            .expect("open")
            .handle
    }

    async fn list_all(handler: &mut SftpHandler, dir: &Path) -> Vec<Vec<NameEntry>> {
        let handle = handler
            .opendir(1, path_str(dir))
            .await
            .expect("opendir")
            .handle;
        let mut batches = Vec::new();
        loop {
            match handler.readdir(2, handle.clone()).await {
                Ok(name) => batches.push(name.files),
                Err(err) => {
                    assert_eq!(err.status_code, StatusCode::Eof);
                    break;
                }
            }
        }
        handler.close(3, handle).await.expect("closedir");
        batches
    }

    #[tokio::test]
    async fn write_read_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("file.bin");
        let mut handler = SftpHandler::default();

        let handle = handler
            .open(
                1,
                path_str(&path),
                OpenFlags::WRITE | OpenFlags::CREATE | OpenFlags::TRUNCATE,
                perms(0o600),
            )
            .await
            .unwrap()
            .handle;
        // Out of order, as a pipelining client may send them.
        handler
            .write(2, handle.clone(), 5, b" world".to_vec())
            .await
            .unwrap();
        let status = handler
            .write(3, handle.clone(), 0, b"hello".to_vec())
            .await
            .unwrap();
        assert_eq!(status.status_code, StatusCode::Ok);
        assert_eq!(status.id, 3);
        let attrs = handler.fstat(4, handle.clone()).await.unwrap().attrs;
        assert_eq!(attrs.size, Some(11));
        handler.close(5, handle.clone()).await.unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"hello world");

        let attrs = handler.stat(6, path_str(&path)).await.unwrap().attrs;
        let mode = attrs.permissions.unwrap();
        assert_eq!(mode & 0o170000, 0o100000, "file type bits are included");
        assert_eq!(mode & 0o777, 0o600);

        let handle = open(&mut handler, &path, OpenFlags::READ).await;
        let data = handler.read(7, handle.clone(), 0, 1 << 20).await.unwrap();
        assert_eq!(data.id, 7);
        assert_eq!(data.data, b"hello world");
        let data = handler.read(8, handle.clone(), 6, 3).await.unwrap();
        assert_eq!(data.data, b"wor");
        let err = handler.read(9, handle.clone(), 11, 100).await.unwrap_err();
        assert_eq!(err.status_code, StatusCode::Eof);
        let err = handler.write(10, handle.clone(), 0, b"x".to_vec()).await;
        assert!(err.is_err(), "a read-only handle cannot write");
        handler.close(11, handle.clone()).await.unwrap();
        let err = handler.read(12, handle, 0, 1).await.unwrap_err();
        assert_eq!(err.status_code, StatusCode::Failure);
    }

    #[tokio::test]
    async fn read_is_capped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        fs::write(&path, vec![7u8; 300 * 1024]).unwrap();
        let mut handler = SftpHandler::default();
        let handle = open(&mut handler, &path, OpenFlags::READ).await;
        let data = handler.read(1, handle.clone(), 0, u32::MAX).await.unwrap();
        assert_eq!(data.data.len(), MAX_IO_LEN as usize);
        let empty = handler.read(2, handle, 0, 0).await.unwrap();
        assert!(empty.data.is_empty());
    }

    #[tokio::test]
    async fn open_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, b"abcdef").unwrap();
        let mut handler = SftpHandler::default();

        let err = handler
            .open(
                1,
                path_str(&path),
                OpenFlags::WRITE | OpenFlags::CREATE | OpenFlags::EXCLUDE,
                FileAttributes::empty(),
            )
            .await
            .unwrap_err();
        assert_eq!(err.status_code, StatusCode::Failure);

        let handle = open(&mut handler, &path, OpenFlags::WRITE | OpenFlags::APPEND).await;
        handler
            .write(2, handle.clone(), 0, b"gh".to_vec())
            .await
            .unwrap();
        handler.close(3, handle).await.unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"abcdefgh");

        let handle = open(&mut handler, &path, OpenFlags::WRITE | OpenFlags::TRUNCATE).await;
        handler.close(4, handle).await.unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"");

        let missing = dir.path().join("missing");
        let err = handler
            .open(
                5,
                path_str(&missing),
                OpenFlags::READ,
                FileAttributes::empty(),
            )
            .await
            .unwrap_err();
        assert_eq!(err.status_code, StatusCode::NoSuchFile);
    }

    #[tokio::test]
    async fn readdir_lists_in_batches() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..150 {
            fs::write(dir.path().join(format!("file{i:03}")), b"x").unwrap();
        }
        fs::create_dir(dir.path().join("sub")).unwrap();
        let mut handler = SftpHandler::default();

        let batches = list_all(&mut handler, dir.path()).await;
        assert_eq!(batches.len(), 2);
        assert_eq!(batches[0].len(), READDIR_BATCH);
        let entries: Vec<NameEntry> = batches.into_iter().flatten().collect();
        assert_eq!(entries.len(), 150 + 1 + 2);
        let names: std::collections::HashSet<&str> =
            entries.iter().map(|e| e.filename.as_str()).collect();
        for name in [".", "..", "sub", "file000", "file149"] {
            assert!(names.contains(name), "{name} listed");
        }
        let sub = entries.iter().find(|e| e.filename == "sub").unwrap();
        assert!(sub.longname.starts_with('d'), "{}", sub.longname);
        assert!(sub.longname.ends_with(" sub"), "{}", sub.longname);
        assert!(sub.attrs.is_dir());
        let file = entries.iter().find(|e| e.filename == "file007").unwrap();
        assert!(file.longname.starts_with("-rw"), "{}", file.longname);
        assert_eq!(file.attrs.size, Some(1));

        // A file handle is not a directory handle.
        let path = dir.path().join("file000");
        let handle = open(&mut handler, &path, OpenFlags::READ).await;
        let err = handler.readdir(9, handle).await.unwrap_err();
        assert_eq!(err.status_code, StatusCode::Failure);
    }

    #[tokio::test]
    async fn realpath_resolves() {
        let dir = tempfile::tempdir().unwrap();
        let canonical = fs::canonicalize(dir.path()).unwrap();
        fs::create_dir(dir.path().join("sub")).unwrap();
        let mut handler = SftpHandler::default();
        let mut resolve = async |path: &str| {
            let name = handler.realpath(1, path.to_owned()).await.unwrap();
            assert_eq!(name.files.len(), 1);
            name.files[0].filename.clone()
        };

        let cwd = path_str(&std::env::current_dir().unwrap().canonicalize().unwrap());
        assert_eq!(resolve(".").await, cwd);
        assert_eq!(resolve("").await, cwd);
        let base = path_str(dir.path());
        assert_eq!(
            resolve(&format!("{base}/sub/../sub/.")).await,
            path_str(&canonical.join("sub"))
        );
        assert_eq!(
            resolve(&format!("{base}/sub/new-file")).await,
            path_str(&canonical.join("sub/new-file"))
        );
        assert_eq!(
            resolve(&format!("{base}/no/such/../dir")).await,
            path_str(&dir.path().join("no/dir"))
        );
        assert_eq!(resolve("/no-such-dir/./x/..").await, "/no-such-dir");
    }

    #[tokio::test]
    async fn missing_paths_and_bad_handles() {
        let dir = tempfile::tempdir().unwrap();
        let missing = path_str(&dir.path().join("missing"));
        let mut handler = SftpHandler::default();

        let err = handler.stat(1, missing.clone()).await.unwrap_err();
        assert_eq!(err.status_code, StatusCode::NoSuchFile);
        let err = handler.lstat(2, missing.clone()).await.unwrap_err();
        assert_eq!(err.status_code, StatusCode::NoSuchFile);
        let err = handler.opendir(3, missing.clone()).await.unwrap_err();
        assert_eq!(err.status_code, StatusCode::NoSuchFile);
        let err = handler.remove(4, missing).await.unwrap_err();
        assert_eq!(err.status_code, StatusCode::NoSuchFile);

        let bogus = || "no-such-handle".to_owned();
        let checks = [
            handler.read(1, bogus(), 0, 10).await.map(drop),
            handler.write(2, bogus(), 0, vec![1]).await.map(drop),
            handler.fstat(3, bogus()).await.map(drop),
            handler
                .fsetstat(4, bogus(), FileAttributes::empty())
                .await
                .map(drop),
            handler.readdir(5, bogus()).await.map(drop),
            handler.close(6, bogus()).await.map(drop),
        ];
        for result in checks {
            let err = result.unwrap_err();
            assert_eq!(err.status_code, StatusCode::Failure);
            assert_eq!(err.error_message.as_deref(), Some("invalid handle"));
        }
    }

    #[tokio::test]
    async fn handle_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, b"x").unwrap();
        let mut handler = SftpHandler {
            max_handles: 3,
            ..SftpHandler::default()
        };
        let first = open(&mut handler, &path, OpenFlags::READ).await;
        open(&mut handler, &path, OpenFlags::READ).await;
        handler.opendir(1, path_str(dir.path())).await.unwrap();
        let err = handler
            .open(2, path_str(&path), OpenFlags::READ, FileAttributes::empty())
            .await
            .unwrap_err();
        assert_eq!(err.error_message.as_deref(), Some("too many open handles"));
        let err = handler.opendir(3, path_str(dir.path())).await.unwrap_err();
        assert_eq!(err.status_code, StatusCode::Failure);
        handler.close(4, first).await.unwrap();
        open(&mut handler, &path, OpenFlags::READ).await;
    }

    #[tokio::test]
    async fn directories_rename_links() {
        let dir = tempfile::tempdir().unwrap();
        let at = |name: &str| path_str(&dir.path().join(name));
        let mut handler = SftpHandler::default();

        handler.mkdir(1, at("d"), perms(0o750)).await.unwrap();
        let mode = fs::metadata(at("d")).unwrap().mode();
        assert_eq!(mode & 0o700, 0o700);
        let err = handler.mkdir(2, at("d"), perms(0o750)).await.unwrap_err();
        assert_eq!(err.status_code, StatusCode::Failure);

        fs::write(at("a"), b"a").unwrap();
        fs::write(at("b"), b"b").unwrap();
        let err = handler.rename(3, at("a"), at("b")).await.unwrap_err();
        assert_eq!(
            err.status_code,
            StatusCode::Failure,
            "rename must not replace"
        );
        handler.rename(4, at("a"), at("c")).await.unwrap();
        assert!(!dir.path().join("a").exists());
        assert_eq!(fs::read(at("c")).unwrap(), b"a");
        let err = handler.rename(5, at("d"), at("c")).await.unwrap_err();
        assert_eq!(err.status_code, StatusCode::Failure);
        handler.rename(6, at("d"), at("e")).await.unwrap();

        // posix-rename replaces.
        let mut body = Vec::new();
        for s in [at("c"), at("b")] {
            body.extend_from_slice(&(s.len() as u32).to_be_bytes());
            body.extend_from_slice(s.as_bytes());
        }
        let reply = handler
            .extended(7, "posix-rename@openssh.com".to_owned(), body)
            .await
            .unwrap();
        assert!(matches!(
            reply,
            Packet::Status(Status {
                status_code: StatusCode::Ok,
                ..
            })
        ));
        assert_eq!(fs::read(at("b")).unwrap(), b"a");

        // OpenSSH order: (what the link points to, the link to create).
        handler
            .symlink(8, "b".to_owned(), at("link"))
            .await
            .unwrap();
        assert_eq!(fs::read_link(at("link")).unwrap(), Path::new("b"));
        let name = handler.readlink(9, at("link")).await.unwrap();
        assert_eq!(name.files[0].filename, "b");
        let attrs = handler.lstat(10, at("link")).await.unwrap().attrs;
        assert!(attrs.is_symlink());
        let attrs = handler.stat(11, at("link")).await.unwrap().attrs;
        assert!(attrs.is_regular());

        handler.remove(12, at("link")).await.unwrap();
        handler.remove(13, at("b")).await.unwrap();
        let err = handler.rmdir(14, at("missing")).await.unwrap_err();
        assert_eq!(err.status_code, StatusCode::NoSuchFile);
        handler.rmdir(15, at("e")).await.unwrap();
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn setstat_and_fsetstat() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, b"0123456789").unwrap();
        let mut handler = SftpHandler::default();
        let own = fs::metadata(&path).unwrap();

        let attrs = FileAttributes {
            size: Some(4),
            permissions: Some(0o640),
            atime: Some(1_000_000_000),
            mtime: Some(1_200_000_000),
            uid: Some(own.uid()),
            gid: Some(own.gid()),
            ..FileAttributes::empty()
        };
        handler.setstat(1, path_str(&path), attrs).await.unwrap();
        let md = fs::metadata(&path).unwrap();
        assert_eq!(md.len(), 4);
        assert_eq!(md.mode() & 0o7777, 0o640);
        assert_eq!(md.atime(), 1_000_000_000);
        assert_eq!(md.mtime(), 1_200_000_000);

        let handle = open(&mut handler, &path, OpenFlags::WRITE).await;
        let attrs = FileAttributes {
            size: Some(2),
            permissions: Some(0o600),
            atime: Some(1_300_000_000),
            mtime: Some(1_400_000_000),
            ..FileAttributes::empty()
        };
        handler.fsetstat(2, handle.clone(), attrs).await.unwrap();
        let md = fs::metadata(&path).unwrap();
        assert_eq!(md.len(), 2);
        assert_eq!(md.mode() & 0o7777, 0o600);
        assert_eq!(md.mtime(), 1_400_000_000);
        let attrs = handler.fstat(3, handle).await.unwrap().attrs;
        assert_eq!(attrs.mtime, Some(1_400_000_000));
        assert_eq!(attrs.atime, Some(1_300_000_000));
    }

    #[tokio::test]
    async fn extended_requests() {
        let dir = tempfile::tempdir().unwrap();
        let mut handler = SftpHandler::default();
        let version = handler.init(3, HashMap::new()).await.unwrap();
        assert_eq!(version.version, 3);
        assert!(version.extensions.contains_key("posix-rename@openssh.com"));

        let reply = handler
            .extended(1, "limits@openssh.com".to_owned(), Vec::new())
            .await
            .unwrap();
        let Packet::ExtendedReply(reply) = reply else {
            panic!("limits: {reply:?}")
        };
        assert_eq!(reply.data.len(), 32);
        assert_eq!(reply.data[..8], u64::from(MAX_PACKET_LEN).to_be_bytes());

        let base = path_str(dir.path());
        let mut body = (base.len() as u32).to_be_bytes().to_vec();
        body.extend_from_slice(base.as_bytes());
        let reply = handler
            .extended(2, "statvfs@openssh.com".to_owned(), body)
            .await
            .unwrap();
        let Packet::ExtendedReply(reply) = reply else {
            panic!("statvfs: {reply:?}")
        };
        assert_eq!(reply.data.len(), 88);

        let err = handler
            .extended(3, "posix-rename@openssh.com".to_owned(), vec![0, 0, 1])
            .await
            .unwrap_err();
        assert_eq!(err.status_code, StatusCode::BadMessage);
        let err = handler
            .extended(4, "posix-rename@openssh.com".to_owned(), vec![0xff; 9])
            .await
            .unwrap_err();
        assert_eq!(err.status_code, StatusCode::BadMessage);
        let err = handler
            .extended(5, "copy-data".to_owned(), Vec::new())
            .await
            .unwrap_err();
        assert_eq!(err.status_code, StatusCode::OpUnsupported);
    }

    #[test]
    fn mode_strings() {
        assert_eq!(mode_string(0o100644), "-rw-r--r-- ");
        assert_eq!(mode_string(0o040755), "drwxr-xr-x ");
        assert_eq!(mode_string(0o120777), "lrwxrwxrwx ");
        assert_eq!(mode_string(0o104755), "-rwsr-xr-x ");
        assert_eq!(mode_string(0o102644), "-rw-r-Sr-- ");
        assert_eq!(mode_string(0o041777), "drwxrwxrwt ");
        assert_eq!(mode_string(0o010600), "prw------- ");
    }

    #[test]
    fn framing_rejects_oversized_packets() {
        let mut framing = Framing::default();
        let mut input = 5u32.to_be_bytes().to_vec();
        input.extend_from_slice(&[1, 0, 0, 0, 3]);
        input.extend_from_slice(&MAX_PACKET_LEN.to_be_bytes());
        // Fed in awkward pieces, as reads may split it.
        for chunk in input.chunks(3) {
            framing.feed(chunk).unwrap();
        }
        assert_eq!(framing.body_left, MAX_PACKET_LEN as usize);
        framing.feed(&vec![0; MAX_PACKET_LEN as usize]).unwrap();
        assert!(framing.feed(&(MAX_PACKET_LEN + 1).to_be_bytes()).is_err());
    }

    async fn read_packet(reader: &mut (impl AsyncRead + Unpin)) -> Vec<u8> {
        let len = reader.read_u32().await.unwrap();
        let mut body = vec![0; len as usize];
        reader.read_exact(&mut body).await.unwrap();
        body
    }

    #[tokio::test]
    async fn serve_runs_until_the_peer_closes() {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (server_read, server_write) = tokio::io::split(server);
        let session = tokio::spawn(serve(server_read, server_write));
        let (mut client_read, mut client_write) = tokio::io::split(client);

        // SSH_FXP_INIT, version 3.
        client_write
            .write_all(&[0, 0, 0, 5, 1, 0, 0, 0, 3])
            .await
            .unwrap();
        let version = read_packet(&mut client_read).await;
        assert_eq!(version[..5], [2, 0, 0, 0, 3]);

        // SSH_FXP_STAT of a missing file: a status reply with NoSuchFile.
        let path = b"/no/such/file";
        let mut stat = vec![17, 0, 0, 0, 42];
        stat.extend_from_slice(&(path.len() as u32).to_be_bytes());
        stat.extend_from_slice(path);
        client_write
            .write_all(&(stat.len() as u32).to_be_bytes())
            .await
            .unwrap();
        client_write.write_all(&stat).await.unwrap();
        let status = read_packet(&mut client_read).await;
        assert_eq!(status[..9], [101, 0, 0, 0, 42, 0, 0, 0, 2]);

        // A garbage packet gets an error status, not a dead session.
        client_write.write_all(&[0, 0, 0, 1, 250]).await.unwrap();
        let status = read_packet(&mut client_read).await;
        assert_eq!(status[0], 101);

        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!session.is_finished(), "the session outlives idle input");
        client_write.shutdown().await.unwrap();
        drop(client_write);
        let outcome = tokio::time::timeout(Duration::from_secs(5), session)
            .await
            .expect("session ends when the input closes")
            .unwrap();
        assert!(outcome.is_ok(), "{outcome:?}");
    }

    #[tokio::test]
    async fn serve_ends_on_oversized_packet() {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (server_read, server_write) = tokio::io::split(server);
        let session = tokio::spawn(serve(server_read, server_write));
        let (_client_read, mut client_write) = tokio::io::split(client);
        client_write
            .write_all(&(MAX_PACKET_LEN + 1).to_be_bytes())
            .await
            .unwrap();
        let outcome = tokio::time::timeout(Duration::from_secs(5), session)
            .await
            .expect("session ends on a protocol violation")
            .unwrap();
        assert_eq!(outcome.unwrap_err().kind(), io::ErrorKind::InvalidData);
        drop(client_write);
    }
}
