use super::*;
use std::time::SystemTime;

const SEG: u64 = 16 << 20;

#[test]
fn segment_names_round_trip() {
    let s = Segment::parse("000000010000000A000000FF", SEG).expect("valid");
    assert_eq!(s.timeline, 1);
    assert_eq!(s.number, 10 * 256 + 255);
    assert_eq!(s.name(SEG), "000000010000000A000000FF");
    assert_eq!(Segment::parse("000000010000000A00000100", SEG), None);
    assert_eq!(Segment::parse("00000001.history", SEG), None);
    assert_eq!(parse_lsn("A/FF000028"), Some((10 << 32) | 0xFF00_0028));
    assert_eq!(format_lsn((10 << 32) | 0xFF00_0028), "A/FF000028");
    assert_eq!(Segment::of_lsn(1, (10 << 32) | 0xFF00_0028, SEG), s);
}

fn catalog(segments: &[&str], partials: &[&str], histories: &[u32]) -> Catalog {
    let mut c = Catalog::default();
    for s in segments {
        c.segments.insert((*s).to_owned(), SystemTime::UNIX_EPOCH);
    }
    for p in partials {
        c.partials.insert((*p).to_owned(), 1);
    }
    for &h in histories {
        c.histories.insert(h, WalFile::History(h).path());
    }
    c
}

#[test]
fn a_missing_segment_is_a_named_gap() {
    let c = catalog(
        &[
            "000000010000000000000002",
            "000000010000000000000003",
            "000000010000000000000005",
        ],
        &["000000010000000000000006"],
        &[],
    );
    let before_gap = plan(&c, &[], SEG, 1, 2 * SEG + 40, End::Lsn(3 * SEG + 8)).expect("no gap");
    assert_eq!(before_gap.files.len(), 2);
    assert_eq!(
        plan(&c, &[], SEG, 1, 2 * SEG, End::Latest),
        Err(ChainError::Gap {
            missing: vec!["000000010000000000000004".into()]
        })
    );
}

#[test]
fn latest_ends_with_the_partial_and_follows_timelines() {
    let c = catalog(
        &[
            "000000010000000000000002",
            "000000010000000000000003",
            "000000020000000000000003",
        ],
        &["000000020000000000000004", "000000010000000000000004"],
        &[2],
    );
    let history =
        History::parse(2, "1\t0/3000100\tno recovery target specified\n").expect("history");
    let plan = plan(&c, &[history], SEG, 1, 2 * SEG, End::Latest).expect("plan");
    assert_eq!(plan.timeline, 2);
    assert_eq!(
        plan.files,
        vec![
            WalFile::Segment("000000010000000000000002".into()),
            WalFile::Segment("000000020000000000000003".into()),
            WalFile::Partial {
                segment: "000000020000000000000004".into(),
                micros: 1
            },
            WalFile::History(2),
        ]
    );
}
