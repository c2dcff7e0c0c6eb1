//! The seed disk writer (`SeedDisk::builder()`, cli/src/disks/seed.rs) round trip: directories
//! and files with generated names (long ones that need ustar's prefix field, `.`, `..`, empty
//! and absolute ones, duplicates, entries below files), contents and modes go in; the image
//! comes back out through a ustar reader written here, independently of the writer.
//!
//! What must hold:
//! - no panic;
//! - `build` refuses exactly the entries the builder documents as invalid (absolute paths, NUL
//!   bytes, `..`, no name at all, modes past 0o7777, paths that fit no ustar header,
//!   duplicates, entries below a file);
//! - an accepted image reads back as the same entries in the same order: the normalised name
//!   (directories with a trailing `/`), type, mode, contents, owner 0/0, mtime 0, valid
//!   checksums; then two zero blocks and zeros to the end, a whole number of 4 KiB blocks.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use nvmm_cli::disks::SeedDisk;

#[derive(Arbitrary, Debug)]
struct Input {
    entries: Vec<EntrySpec>,
}

#[derive(Arbitrary, Debug)]
enum EntrySpec {
    Dir(PathSpec),
    File {
        path: PathSpec,
        contents: Contents,
        mode: Mode,
    },
}

/// A path: from components (so long and nested ones are common), or any string.
#[derive(Arbitrary, Debug)]
enum PathSpec {
    Parts { absolute: bool, parts: Vec<Part> },
    Any(String),
}

#[derive(Arbitrary, Debug)]
enum Part {
    /// A name of `len % 160 + 1` copies of one character (ASCII or not).
    Name {
        first: char,
        len: u8,
    },
    Text(String),
    Dot,
    DotDot,
    Empty,
}

#[derive(Arbitrary, Debug)]
enum Contents {
    Bytes(Vec<u8>),
    /// `len` copies of `byte`: sizes around block boundaries without long inputs.
    Repeat {
        byte: u8,
        len: u16,
    },
}

#[derive(Arbitrary, Debug)]
enum Mode {
    Permissions(u16),
    Any(u32),
}

impl PathSpec {
    fn text(&self) -> String {
        match self {
            PathSpec::Any(text) => text.clone(),
            PathSpec::Parts { absolute, parts } => {
                let parts: Vec<String> = parts
                    .iter()
                    .map(|part| match part {
                        Part::Name { first, len } => {
                            first.to_string().repeat(usize::from(*len) % 160 + 1)
                        }
                        Part::Text(text) => text.clone(),
                        Part::Dot => ".".to_owned(),
                        Part::DotDot => "..".to_owned(),
                        Part::Empty => String::new(),
                    })
                    .collect();
                let joined = parts.join("/");
                if *absolute {
                    format!("/{joined}")
                } else {
                    joined
                }
            }
        }
    }
}

/// One entry as it should come out of the archive.
#[derive(Debug, PartialEq, Eq)]
struct Expected {
    /// The path as given.
    given: String,
    directory: bool,
    mode: u32,
    contents: Vec<u8>,
}

/// The normalised path (no empty or `.` components), or why the builder must refuse it.
fn normalise(path: &str) -> Result<String, &'static str> {
    if path.starts_with('/') {
        return Err("absolute");
    }
    if path.contains('\0') {
        return Err("NUL");
    }
    let parts: Vec<&str> = path
        .split('/')
        .filter(|part| !part.is_empty() && *part != ".")
        .collect();
    if parts.contains(&"..") {
        return Err("..");
    }
    if parts.is_empty() {
        return Err("no name");
    }
    Ok(parts.join("/"))
}

/// Whether `stored` fits ustar's 100-byte name, or a prefix of at most 155 bytes, a `/`, and a
/// name of 1 to 100 bytes.
fn fits_ustar(stored: &str) -> bool {
    stored.len() <= 100
        || stored.match_indices('/').any(|(slash, _)| {
            let name = stored.len() - slash - 1;
            slash <= 155 && (1..=100).contains(&name)
        })
}

/// The stored names of `entries`, or `None` if the builder must refuse them.
fn accepted_names(entries: &[Expected]) -> Option<Vec<String>> {
    let mut names = Vec::new();
    for entry in entries {
        let path = normalise(&entry.given).ok()?;
        if entry.mode > 0o7777 {
            return None;
        }
        let stored = if entry.directory {
            format!("{path}/")
        } else {
            path.clone()
        };
        if !fits_ustar(&stored) {
            return None;
        }
        names.push((path, stored));
    }
    for (i, (path, _)) in names.iter().enumerate() {
        if names[..i].iter().any(|(earlier, _)| earlier == path) {
            return None; // twice
        }
        // Below a file, wherever the file comes in the list.
        let below_a_file = names
            .iter()
            .zip(entries)
            .filter(|(_, entry)| !entry.directory)
            .any(|((file, _), _)| {
                path.strip_prefix(file.as_str())
                    .is_some_and(|rest| rest.starts_with('/'))
            });
        if below_a_file {
            return None;
        }
    }
    Some(names.into_iter().map(|(_, stored)| stored).collect())
}

/// One member read back from the archive.
#[derive(Debug)]
struct Member {
    name: String,
    typeflag: u8,
    mode: u32,
    contents: Vec<u8>,
}

/// A NUL-terminated (or full) text field.
fn text_field(field: &[u8]) -> &[u8] {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    &field[..end]
}

/// An octal number field: digits, then NUL or space padding.
fn octal_field(field: &[u8]) -> u64 {
    let digits = field
        .iter()
        .position(|&b| b == 0 || b == b' ')
        .unwrap_or(field.len());
    assert!(digits > 0, "empty octal field {field:?}");
    field[..digits].iter().fold(0u64, |n, &d| {
        assert!((b'0'..=b'7').contains(&d), "bad octal digit in {field:?}");
        n * 8 + u64::from(d - b'0')
    })
}

/// Reads a ustar image: the members, checking every header, the end-of-archive blocks and the
/// zeros after them.
fn read_ustar(image: &[u8]) -> Vec<Member> {
    const BLOCK: usize = 512;
    assert_eq!(image.len() % 4096, 0, "not whole device blocks");
    let mut members = Vec::new();
    let mut offset = 0;
    loop {
        let header = image
            .get(offset..offset + BLOCK)
            .expect("the archive ends without two zero blocks");
        if header.iter().all(|&b| b == 0) {
            break;
        }
        let stored_sum: u32 = header
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    u32::from(b' ')
                } else {
                    u32::from(b)
                }
            })
            .sum();
        assert_eq!(
            octal_field(&header[148..156]),
            u64::from(stored_sum),
            "checksum"
        );
        assert_eq!(&header[257..263], b"ustar\0", "magic");
        assert_eq!(&header[263..265], b"00", "version");
        assert_eq!(octal_field(&header[108..116]), 0, "uid");
        assert_eq!(octal_field(&header[116..124]), 0, "gid");
        assert_eq!(octal_field(&header[136..148]), 0, "mtime");
        let name = text_field(&header[0..100]);
        let prefix = text_field(&header[345..500]);
        let full = if prefix.is_empty() {
            name.to_vec()
        } else {
            [prefix, b"/", name].concat()
        };
        let size = usize::try_from(octal_field(&header[124..136])).expect("a small size");
        let data = offset + BLOCK;
        let contents = image
            .get(data..data + size)
            .expect("contents past the image")
            .to_vec();
        let next = data + size.next_multiple_of(BLOCK);
        assert!(
            image[data + size..next].iter().all(|&b| b == 0),
            "padding not zero"
        );
        members.push(Member {
            name: String::from_utf8(full).expect("names are UTF-8"),
            typeflag: header[156],
            mode: u32::try_from(octal_field(&header[100..108])).expect("a small mode"),
            contents,
        });
        offset = next;
    }
    let end = offset + 2 * 512;
    assert!(image.len() >= end, "one zero block only");
    assert!(
        image[offset..].iter().all(|&b| b == 0),
        "data after the end"
    );
    members
}

fuzz_target!(|input: Input| {
    let mut builder = SeedDisk::builder();
    let mut entries = Vec::new();
    for spec in &input.entries {
        let entry = match spec {
            EntrySpec::Dir(path) => {
                let given = path.text();
                builder.dir(&given);
                Expected {
                    given,
                    directory: true,
                    mode: 0o755,
                    contents: Vec::new(),
                }
            }
            EntrySpec::File {
                path,
                contents,
                mode,
            } => {
                let given = path.text();
                let contents = match contents {
                    Contents::Bytes(bytes) => bytes.clone(),
                    Contents::Repeat { byte, len } => vec![*byte; usize::from(*len)],
                };
                let mode = match mode {
                    Mode::Permissions(bits) => u32::from(*bits),
                    Mode::Any(mode) => *mode,
                };
                builder.file(&given, &contents, mode);
                Expected {
                    given,
                    directory: false,
                    mode,
                    contents,
                }
            }
        };
        entries.push(entry);
    }

    let built = builder.build();
    let names = accepted_names(&entries);
    let (image, names) = match (built, names) {
        (Ok(image), Some(names)) => (image, names),
        (Err(_), None) => return,
        (built, names) => panic!(
            "build gave {:?}, expected {}",
            built.map(|_| "an image"),
            if names.is_some() {
                "an image"
            } else {
                "an error"
            }
        ),
    };
    let members = read_ustar(image.as_bytes());
    assert_eq!(members.len(), entries.len());
    for ((member, entry), name) in members.iter().zip(&entries).zip(&names) {
        assert_eq!(&member.name, name, "given {:?}", entry.given);
        assert_eq!(member.typeflag, if entry.directory { b'5' } else { b'0' });
        assert_eq!(member.mode, entry.mode, "{name}");
        assert_eq!(member.contents, entry.contents, "{name}");
    }
});
