//! Where journal output bytes live: in anonymous memory mappings marked `MADV_DONTFORK`, not
//! on the heap. Every process the agent starts begins with a fork of the agent; with journals
//! on the heap that fork would copy page tables for every journal byte (a full 1 GiB journal
//! made each `fork` ~50 ms). Outside the forked address space, journals cost a spawn nothing.
//!
//! Output is appended into 1 MiB chunks; a record holds a slice of a chunk, and a chunk is
//! unmapped when its last record is gone. Should a mapping fail, bytes stay on the heap.

use std::ptr::NonNull;
use std::sync::Arc;

/// Size of a shared chunk; larger outputs get a chunk of their own.
const CHUNK: usize = 1 << 20;

/// One anonymous mapping. Bytes below `used` are written once, before any slice of them
/// exists, and never again; so readers need no lock.
struct Chunk {
    ptr: NonNull<u8>,
    cap: usize,
}

// SAFETY: the mapping is plain memory owned by this value; it is written only through
// `Arena::store` (under the journal's lock, beyond every existing slice) and read through
// slices of fully written ranges.
unsafe impl Send for Chunk {}
// SAFETY: see above: shared access is read-only.
unsafe impl Sync for Chunk {}

impl Chunk {
    fn map(cap: usize) -> Option<Chunk> {
        // SAFETY: an anonymous private mapping with no address hint has no preconditions.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                cap,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return None;
        }
        // SAFETY: `ptr` is the mapping just made, `cap` its length. Failure only means the
        // pages are forked like any other memory.
        unsafe {
            libc::madvise(ptr, cap, libc::MADV_DONTFORK);
        }
        NonNull::new(ptr.cast()).map(|ptr| Chunk { ptr, cap })
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping this value owns, once.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.cap);
        }
    }
}

/// Bytes of one record.
pub struct Payload(Place);

enum Place {
    Mapped {
        chunk: Arc<Chunk>,
        offset: usize,
        len: usize,
    },
    Heap(Vec<u8>),
}

impl Payload {
    pub fn bytes(&self) -> &[u8] {
        match &self.0 {
            // SAFETY: `offset..offset + len` lies within the chunk and was fully written
            // before this payload was created; nothing writes it again.
            Place::Mapped { chunk, offset, len } => unsafe {
                std::slice::from_raw_parts(chunk.ptr.as_ptr().add(*offset), *len)
            },
            Place::Heap(v) => v,
        }
    }
}

/// Appends payloads into chunks.
#[derive(Default)]
pub struct Arena {
    current: Option<(Arc<Chunk>, usize)>,
}

impl Arena {
    pub fn store(&mut self, data: Vec<u8>) -> Payload {
        let len = data.len();
        if len == 0 {
            return Payload(Place::Heap(data));
        }
        if len > CHUNK / 4 {
            // A large output gets a chunk of its own; the shared one stays current.
            return match Chunk::map(len.next_multiple_of(4096)) {
                Some(chunk) => {
                    let chunk = Arc::new(chunk);
                    write(&chunk, 0, &data);
                    Payload(Place::Mapped {
                        chunk,
                        offset: 0,
                        len,
                    })
                }
                None => Payload(Place::Heap(data)),
            };
        }
        let fits = self
            .current
            .as_ref()
            .is_some_and(|(c, used)| c.cap - used >= len);
        if !fits {
            match Chunk::map(CHUNK) {
                Some(chunk) => self.current = Some((Arc::new(chunk), 0)),
                None => return Payload(Place::Heap(data)),
            }
        }
        let Some((chunk, used)) = self.current.as_mut() else {
            return Payload(Place::Heap(data));
        };
        let offset = *used;
        write(chunk, offset, &data);
        *used += len;
        Payload(Place::Mapped {
            chunk: chunk.clone(),
            offset,
            len,
        })
    }
}

fn write(chunk: &Chunk, offset: usize, data: &[u8]) {
    debug_assert!(offset + data.len() <= chunk.cap);
    // SAFETY: the range is inside the mapping (checked by the caller's capacity test) and
    // beyond every existing payload of this chunk, so nobody reads it yet.
    unsafe {
        std::ptr::copy_nonoverlapping(data.as_ptr(), chunk.ptr.as_ptr().add(offset), data.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_and_large_payloads_round_trip() {
        let mut arena = Arena::default();
        let a = arena.store(b"hello".to_vec());
        let b = arena.store(vec![7u8; 3000]);
        let big = arena.store(vec![9u8; CHUNK + 5]);
        let c = arena.store(b"after".to_vec());
        assert_eq!(a.bytes(), b"hello");
        assert_eq!(b.bytes(), &[7u8; 3000][..]);
        assert_eq!(big.bytes().len(), CHUNK + 5);
        assert!(big.bytes().iter().all(|&x| x == 9));
        assert_eq!(c.bytes(), b"after");
        // Small ones share a chunk.
        match (&a.0, &c.0) {
            (Place::Mapped { chunk: x, .. }, Place::Mapped { chunk: y, .. }) => {
                assert!(Arc::ptr_eq(x, y))
            }
            _ => panic!("not mapped"),
        }
        drop((a, b, big, c));
        // Many chunks' worth, then freed.
        let all: Vec<Payload> = (0..3000)
            .map(|i| arena.store(vec![i as u8; 1000]))
            .collect();
        assert!(
            all.iter()
                .enumerate()
                .all(|(i, p)| p.bytes() == vec![i as u8; 1000])
        );
    }

    #[test]
    fn journal_pages_are_not_inherited_by_a_fork() {
        let mut arena = Arena::default();
        let p = arena.store(vec![1u8; 4096]);
        let Place::Mapped { chunk, .. } = &p.0 else {
            panic!("not mapped")
        };
        let addr = chunk.ptr.as_ptr() as usize;
        // /proc/self/smaps lists the mapping's VmFlags; "dc" is "do not copy on fork".
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut lines = smaps.lines();
        let mut flags = String::new();
        while let Some(line) = lines.next() {
            let range = line.split_whitespace().next().unwrap_or_default();
            let Some((lo, hi)) = range.split_once('-') else {
                continue;
            };
            let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
            else {
                continue;
            };
            if (lo..hi).contains(&addr) {
                flags = lines
                    .find(|l| l.starts_with("VmFlags"))
                    .unwrap_or_default()
                    .to_string();
                break;
            }
        }
        let section = flags;
        assert!(
            section.contains(" dc"),
            "no MADV_DONTFORK flag: {section:?}"
        );
    }
}
