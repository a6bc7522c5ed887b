//! The documentation's relative links resolve: every Markdown link `[text](target)` in
//! README.md, docs/*.md and the READMEs of `loadtest/`, `static/` and `fuzz/` that is not
//! http(s) or mailto names a file that exists (relative to the linking file), and its
//! `#anchor`, if any, is produced by a heading of the target file under GitHub's rules.
//! Every docs/*.md starts with a title and a contents list that links to each of its `##`
//! sections. Links inside fenced code blocks and code spans are not links and are skipped.
//!
//! Std only: run alone with `cargo test --test doc_links`.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::path::{Component, Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The files whose links are checked, relative to the repository root.
fn checked_files() -> Vec<PathBuf> {
    let mut files = vec![PathBuf::from("README.md")];
    files.extend(docs_files());
    for other in ["loadtest/README.md", "static/README.md", "fuzz/README.md"] {
        if root().join(other).is_file() {
            files.push(PathBuf::from(other));
        }
    }
    files
}

/// docs/*.md, sorted.
fn docs_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(root().join("docs"))
        .expect("docs/ exists")
        .map(|e| e.expect("docs/ is readable").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .map(|p| PathBuf::from("docs").join(p.file_name().unwrap()))
        .collect();
    files.sort();
    files
}

/// A line of a Markdown file outside fenced code blocks, with its 1-based number.
struct Line<'a> {
    number: usize,
    text: &'a str,
}

/// The lines outside fenced code blocks (``` or ~~~, closed by a fence of the same
/// character at least as long; indented fences inside list items count too).
fn prose_lines(markdown: &str) -> Vec<Line<'_>> {
    let mut lines = Vec::new();
    let mut fence: Option<(char, usize)> = None;
    for (i, text) in markdown.lines().enumerate() {
        let trimmed = text.trim_start();
        let marker = trimmed.chars().next().filter(|c| *c == '`' || *c == '~');
        let run = marker.map_or(0, |c| trimmed.chars().take_while(|x| *x == c).count());
        match (fence, marker) {
            (None, Some(c)) if run >= 3 => fence = Some((c, run)),
            (Some((c, n)), Some(m))
                if m == c && run >= n && trimmed[run * c.len_utf8()..].trim().is_empty() =>
            {
                fence = None
            }
            (None, _) => lines.push(Line {
                number: i + 1,
                text,
            }),
            (Some(_), _) => {}
        }
    }
    lines
}

/// Consecutive prose lines (no blank line between them): a paragraph, a list, a table.
/// Links are looked for per block, since a link's text may wrap onto the next line.
struct Block {
    first_line: usize,
    text: String,
}

fn prose_blocks(markdown: &str) -> Vec<Block> {
    let mut blocks: Vec<Block> = Vec::new();
    let mut last = 0;
    for line in prose_lines(markdown) {
        if line.text.trim().is_empty() {
            last = 0;
            continue;
        }
        match blocks.last_mut() {
            Some(block) if last != 0 && line.number == last + 1 => {
                block.text.push('\n');
                block.text.push_str(line.text);
            }
            _ => blocks.push(Block {
                first_line: line.number,
                text: line.text.to_owned(),
            }),
        }
        last = line.number;
    }
    blocks
}

/// `text` with every byte of its code spans (backticks included) but newlines replaced by
/// `x`: byte offsets stay those of `text`, and a `[x](y)` written as code is no link.
fn masked_code_spans(text: &str) -> Vec<u8> {
    let mut bytes = text.as_bytes().to_vec();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'`' {
            i += 1;
            continue;
        }
        let ticks = bytes[i..].iter().take_while(|b| **b == b'`').count();
        let after = i + ticks;
        let closing = (after..bytes.len()).find(|&j| {
            bytes[j..].iter().take_while(|b| **b == b'`').count() == ticks
                && (j == 0 || bytes[j - 1] != b'`')
        });
        match closing {
            Some(end) => {
                for b in &mut bytes[i..end + ticks] {
                    if *b != b'\n' {
                        *b = b'x';
                    }
                }
                i = end + ticks;
            }
            None => i = after,
        }
    }
    bytes
}

/// The links of a block: inline links `[text](target)` (and images), whose text may span
/// lines, and reference definitions `[label]: target`, each with the byte offset of its `[`.
fn links(text: &str) -> Vec<(usize, String)> {
    let bytes = masked_code_spans(text);
    let mut found = Vec::new();
    for i in 0..bytes.len() {
        if bytes[i] != b'[' || (i > 0 && bytes[i - 1] == b'\\') {
            continue;
        }
        // The matching `]`, brackets nested.
        let mut depth = 0;
        let mut close = None;
        let mut j = i;
        while j < bytes.len() {
            match bytes[j] {
                b'\\' => j += 1,
                b'[' => depth += 1,
                b']' => {
                    depth -= 1;
                    if depth == 0 {
                        close = Some(j);
                        break;
                    }
                }
                _ => {}
            }
            j += 1;
        }
        let Some(close) = close else { continue };
        if bytes.get(close + 1) == Some(&b'(') {
            // The matching `)` on the same line, parentheses nested.
            let mut depth = 0;
            let mut end = close + 1;
            while end < bytes.len() && bytes[end] != b'\n' {
                match bytes[end] {
                    b'(' => depth += 1,
                    b')' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    _ => {}
                }
                end += 1;
            }
            let inside = text[close + 2..end].trim();
            let target = match inside.strip_prefix('<') {
                Some(angled) => angled.split('>').next().unwrap_or(""),
                None => inside.split_whitespace().next().unwrap_or(""),
            };
            found.push((i, target.to_owned()));
            continue;
        }
        let line_start = text[..i].rfind('\n').map_or(0, |n| n + 1);
        let definition =
            text[line_start..i].trim().is_empty() && bytes.get(close + 1) == Some(&b':');
        let defined = text[close + 1..]
            .strip_prefix(':')
            .and_then(|d| d.split_whitespace().next());
        if let (true, Some(target)) = (definition, defined) {
            found.push((i, target.trim_matches(['<', '>']).to_owned()));
        }
    }
    found
}

/// The link targets of a piece of Markdown prose.
fn link_targets(text: &str) -> Vec<String> {
    links(text).into_iter().map(|(_, target)| target).collect()
}

/// GitHub's anchor for a heading's text: inline links reduced to their text, lowercased,
/// everything but letters, digits, spaces, hyphens and underscores removed (backticks and
/// punctuation included), each space a hyphen.
fn slug(heading: &str) -> String {
    let mut text = String::new();
    let mut rest = heading;
    // `[text](url)` renders as `text`.
    while let Some(open) = rest.find('[') {
        let Some(mid) = rest[open..].find("](") else {
            break;
        };
        let Some(end) = rest[open + mid..].find(')') else {
            break;
        };
        text.push_str(&rest[..open]);
        text.push_str(&rest[open + 1..open + mid]);
        rest = &rest[open + mid + end + 1..];
    }
    text.push_str(rest);
    text.trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// A heading of a Markdown file: its level, its text and its line.
struct Heading {
    level: usize,
    text: String,
    line: usize,
}

/// The ATX headings (`# ...` to `###### ...`) outside fenced code blocks.
fn headings(markdown: &str) -> Vec<Heading> {
    prose_lines(markdown)
        .into_iter()
        .filter_map(|line| {
            let text = line.text.trim_start_matches(' ');
            if line.text.len() - text.len() > 3 {
                return None;
            }
            let level = text.chars().take_while(|c| *c == '#').count();
            let rest = &text[level..];
            if !(1..=6).contains(&level) || !(rest.is_empty() || rest.starts_with([' ', '\t'])) {
                return None;
            }
            // A closing sequence of `#`s is not part of the text.
            let rest = rest.trim();
            let rest = match rest.trim_end_matches('#') {
                r if r.is_empty() || r.ends_with([' ', '\t']) => r.trim_end(),
                _ => rest,
            };
            Some(Heading {
                level,
                text: rest.to_owned(),
                line: line.number,
            })
        })
        .collect()
}

/// Every anchor a file offers: its headings' slugs (a repeated slug gets `-1`, `-2`, …) and
/// explicit `<a name="…">` / `id="…"` anchors.
fn anchors(markdown: &str) -> BTreeSet<String> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut anchors = BTreeSet::new();
    for heading in headings(markdown) {
        let base = slug(&heading.text);
        let count = seen.entry(base.clone()).or_insert(0);
        anchors.insert(if *count == 0 {
            base.clone()
        } else {
            format!("{base}-{count}")
        });
        *count += 1;
    }
    for line in prose_lines(markdown) {
        for attribute in ["name=\"", "id=\""] {
            let mut rest = line.text;
            while let Some(at) = rest.find(attribute) {
                let value = &rest[at + attribute.len()..];
                if let Some(end) = value.find('"') {
                    anchors.insert(value[..end].to_owned());
                }
                rest = value;
            }
        }
    }
    anchors
}

/// `%XX` escapes decoded (as in `my%20file.md`).
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `path` with `.` and `..` resolved lexically (the files need not exist).
fn normalized(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other),
        }
    }
    out
}

fn is_external(target: &str) -> bool {
    let lower = target.to_ascii_lowercase();
    ["http://", "https://", "mailto:"]
        .iter()
        .any(|scheme| lower.starts_with(scheme))
}

/// Every broken relative link of `file` (relative to the repository root), as
/// `file:line: target: why`.
fn broken_links(file: &Path, cache: &mut HashMap<PathBuf, Option<String>>) -> Vec<String> {
    let mut read = |path: &Path| -> Option<String> {
        cache
            .entry(path.to_owned())
            .or_insert_with(|| fs::read_to_string(root().join(path)).ok())
            .clone()
    };
    let markdown = read(file).unwrap_or_else(|| panic!("{} is readable", file.display()));
    let dir = file.parent().unwrap_or(Path::new(""));
    let mut broken = Vec::new();
    for block in prose_blocks(&markdown) {
        for (offset, target) in links(&block.text) {
            if is_external(&target) {
                continue;
            }
            let line = block.first_line + block.text[..offset].matches('\n').count();
            let at = format!("{}:{line}: ({target})", file.display());
            if target.is_empty() {
                broken.push(format!("{at}: empty link target"));
                continue;
            }
            let (path_part, anchor) = match target.split_once('#') {
                Some((p, a)) => (p, Some(a)),
                None => (target.as_str(), None),
            };
            let linked = if path_part.is_empty() {
                file.to_owned()
            } else if path_part.starts_with('/') {
                broken.push(format!("{at}: absolute path; link relative to the file"));
                continue;
            } else {
                normalized(&dir.join(percent_decoded(path_part)))
            };
            if linked.starts_with("..") || !root().join(&linked).exists() {
                broken.push(format!("{at}: {} does not exist", linked.display()));
                continue;
            }
            let Some(anchor) = anchor else { continue };
            let is_markdown = linked.extension().is_some_and(|e| e == "md");
            if !is_markdown {
                // GitHub's line anchors (`#L10`, `#L10-L20`) are the only ones in other files.
                let line_anchor = anchor.split('-').all(|p| {
                    p.len() > 1 && p.starts_with('L') && p[1..].bytes().all(|b| b.is_ascii_digit())
                });
                if !line_anchor {
                    broken.push(format!("{at}: #{anchor} in a file that is not Markdown"));
                }
                continue;
            }
            let Some(target_text) = read(&linked) else {
                broken.push(format!("{at}: {} is not readable", linked.display()));
                continue;
            };
            if !anchors(&target_text).contains(&percent_decoded(anchor)) {
                broken.push(format!(
                    "{at}: no heading of {} makes the anchor #{anchor}",
                    linked.display()
                ));
            }
        }
    }
    broken
}

/// Whether a block is a list (its first line is a list item).
fn is_list(block: &str) -> bool {
    let t = block.trim_start();
    t.starts_with("- ")
        || t.starts_with("* ")
        || t.split_once(". ")
            .is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

#[test]
fn every_relative_link_and_anchor_resolves() {
    let mut cache = HashMap::new();
    let mut broken = Vec::new();
    let files = checked_files();
    for file in &files {
        broken.extend(broken_links(file, &mut cache));
    }
    assert!(
        broken.is_empty(),
        "{} broken link(s) in {} file(s):\n{}",
        broken.len(),
        files.len(),
        broken.join("\n")
    );
}

#[test]
fn every_docs_page_has_a_title_and_a_contents_list_of_its_sections() {
    let files = docs_files();
    assert!(!files.is_empty(), "docs/ has Markdown files");
    let mut problems = Vec::new();
    for file in files {
        let markdown = fs::read_to_string(root().join(&file)).expect("readable");
        let first = markdown
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        if !first.starts_with("# ") {
            problems.push(format!(
                "{}:1: does not start with a `# ` title",
                file.display()
            ));
        }
        let all = headings(&markdown);
        let sections: Vec<&Heading> = all.iter().filter(|h| h.level == 2).collect();
        if sections.is_empty() {
            problems.push(format!("{}: has no `##` sections", file.display()));
            continue;
        }
        // The contents list: list items before the first section that link into the file.
        let listed: BTreeSet<String> = prose_blocks(&markdown)
            .into_iter()
            .filter(|b| b.first_line < sections[0].line && is_list(&b.text))
            .flat_map(|b| link_targets(&b.text))
            .filter_map(|t| t.strip_prefix('#').map(str::to_owned))
            .collect();
        if listed.is_empty() {
            problems.push(format!(
                "{}: no contents list (list items linking to `#sections`) before its first `##`",
                file.display()
            ));
            continue;
        }
        // Anchors as GitHub numbers them, over all headings of the file.
        let mut seen: HashMap<String, usize> = HashMap::new();
        for heading in &all {
            let base = slug(&heading.text);
            let count = seen.entry(base.clone()).or_insert(0);
            let anchor = if *count == 0 {
                base.clone()
            } else {
                format!("{base}-{count}")
            };
            *count += 1;
            if heading.level == 2 && !listed.contains(&anchor) {
                problems.push(format!(
                    "{}:{}: section \"{}\" (#{anchor}) is missing from the contents list",
                    file.display(),
                    heading.line,
                    heading.text
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn slugs_follow_githubs_rules() {
    assert_eq!(slug("Run it in production"), "run-it-in-production");
    assert_eq!(
        slug("History and recovery (`--history N`)"),
        "history-and-recovery---history-n"
    );
    assert_eq!(
        slug("History and recovery (`drops`, history A/B; details in `loadtest/README.md`)"),
        "history-and-recovery-drops-history-ab-details-in-loadtestreadmemd"
    );
    assert_eq!(
        slug("Redis keys (prefix `P`, default `wsbus`)"),
        "redis-keys-prefix-p-default-wsbus"
    );
    assert_eq!(
        slug("`WSBUS_API_KEYS` and 100,000 µs"),
        "wsbus_api_keys-and-100000-µs"
    );
    assert_eq!(slug("See [the API](api.md)"), "see-the-api");
    let twice = "# A\n\n## Rooms\n\n```sh\n# Rooms\n```\n\n## Rooms\n\n### Rooms\n";
    let anchors = anchors(twice);
    assert!(
        anchors.contains("rooms") && anchors.contains("rooms-1") && anchors.contains("rooms-2")
    );
    assert!(
        !anchors.contains("rooms-3"),
        "a `#` line inside a code block is no heading"
    );
}

#[test]
fn links_are_found_outside_code_only() {
    assert_eq!(
        link_targets("see [`static/README.md`](static/README.md) and [x](a.md#b \"title\")"),
        ["static/README.md", "a.md#b"]
    );
    assert!(link_targets("`[not](a link)` and [not a link] (either)").is_empty());
    assert_eq!(link_targets("[ref]: docs/api.md"), ["docs/api.md"]);
    let fenced = "[a](a.md)\n```text\n[b](b.md)\n```\n[c](c.md)\n";
    let found: Vec<String> = prose_blocks(fenced)
        .iter()
        .flat_map(|b| link_targets(&b.text))
        .collect();
    assert_eq!(found, ["a.md", "c.md"]);
    // A link whose text wraps onto the next line is still a link, reported on its first line.
    let wrapped =
        "intro\n\nsee [Where the API is\nserved](api.md#where) and\n`[x](code.md)` [y](y.md)\n";
    let blocks = prose_blocks(wrapped);
    assert_eq!(blocks.len(), 2);
    assert_eq!(blocks[1].first_line, 3);
    let block = &blocks[1];
    let found: Vec<(usize, String)> = links(&block.text)
        .into_iter()
        .map(|(offset, t)| {
            (
                block.first_line + block.text[..offset].matches('\n').count(),
                t,
            )
        })
        .collect();
    assert_eq!(
        found,
        [(3, "api.md#where".to_owned()), (5, "y.md".to_owned())]
    );
}
