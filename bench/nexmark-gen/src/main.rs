//! `nexmark-gen EVENTS OUT.jsonl`: the bids among the first EVENTS Nexmark events, one JSON
//! object per line (`auction, bidder, price, channel, url, date_time, extra`; `date_time`
//! in epoch milliseconds).
//!
//! The generator is built from an explicit config (fixed base time, 10,000 events per
//! second of event time), and the output is checked for repeats: a generator built with
//! its defaults in some ways yields one event over and over.

use std::collections::HashSet;
use std::io::{BufWriter, Write};

use nexmark::config::NexmarkConfig;
use nexmark::event::{Event, EventType};
use nexmark::EventGenerator;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, events, out] = args.as_slice() else {
        eprintln!("usage: nexmark-gen EVENTS OUT.jsonl");
        std::process::exit(2);
    };
    let events: usize = events.parse().expect("EVENTS is a number");
    let config = NexmarkConfig {
        base_time: 1_700_000_000_000,
        first_rate: 10_000,
        next_rate: 10_000,
        ..Default::default()
    };
    let generator = EventGenerator::new(config).with_type_filter(EventType::Bid);
    let file = std::fs::File::create(out).expect("create the output file");
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let mut seen = HashSet::new();
    let mut bids = 0usize;
    // The filter skips the other kinds: about 46 in 50 events are bids.
    for event in generator.take(events * 46 / 50) {
        let Event::Bid(b) = event else { continue };
        seen.insert((b.auction, b.bidder, b.price, b.date_time));
        let line = serde_json::json!({
            "auction": b.auction,
            "bidder": b.bidder,
            "price": b.price,
            "channel": b.channel,
            "url": b.url,
            "date_time": b.date_time,
            "extra": b.extra,
        });
        serde_json::to_writer(&mut w, &line).unwrap();
        w.write_all(b"\n").unwrap();
        bids += 1;
    }
    w.flush().unwrap();
    assert!(
        seen.len() * 100 >= bids * 99,
        "the generator repeats itself: {} distinct of {bids}",
        seen.len()
    );
    eprintln!("{bids} bids ({} distinct) in {out}", seen.len());
}
