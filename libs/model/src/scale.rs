//! Scaling plans and the slot-map steps of a live migration (DESIGN.md §6):
//! which ranges move where for an even spread, and the pure transitions a
//! migration takes the cluster through (prepare → move → commit → done).

use std::collections::BTreeMap;

use crate::slots::ranges_from_sorted;
use crate::{
    Chunk, Cluster, MigrationStage, ModelError, ProxyId, ShardId, Slot, SlotAssignment,
    SlotMigration, SlotRange, NODES_PER_CHUNK, SLOT_COUNT,
};

/// Largest cluster: every master needs at least one slot.
pub const MAX_NODE_COUNT: u32 = SLOT_COUNT as u32;

/// Checks a node count: a positive multiple of 4, not absurdly large.
pub fn check_node_count(node_count: u32) -> Result<usize, ModelError> {
    if node_count == 0 || !node_count.is_multiple_of(NODES_PER_CHUNK) {
        return Err(ModelError::invalid(
            "node_count",
            format!("{node_count} is not a positive multiple of {NODES_PER_CHUNK} (each chunk has 4 Redis nodes)"),
        ));
    }
    if node_count > MAX_NODE_COUNT {
        return Err(ModelError::invalid(
            "node_count",
            format!("{node_count} exceeds the maximum of {MAX_NODE_COUNT}"),
        ));
    }
    Ok((node_count / NODES_PER_CHUNK) as usize)
}

/// One planned move of a slot range between shards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    /// Slots moved.
    pub range: SlotRange,
    /// Source shard.
    pub from: ShardId,
    /// Destination shard.
    pub to: ShardId,
}

impl Cluster {
    /// The cluster with `chunks` appended, each contributing two new shards
    /// (node 0 master, node 1 replica of the partner's master) that own no
    /// slots yet.
    pub fn with_chunks(&self, chunks: &[Chunk]) -> Result<Cluster, ModelError> {
        let mut c = self.clone();
        for chunk in chunks {
            c.shards.extend(chunk.shards(c.next_shard_id));
            c.next_shard_id += 2;
            c.chunks.push(chunk.clone());
        }
        c.check()?;
        Ok(c)
    }

    /// The cluster without `chunks` and their shards, which must own no
    /// slots and be the target of no migration.
    pub fn without_chunks(&self, chunks: &[Chunk]) -> Result<Cluster, ModelError> {
        let gone: Vec<&ProxyId> = chunks.iter().flat_map(|c| c.proxies.iter()).collect();
        let mut c = self.clone();
        let removed: Vec<ShardId> = c
            .shards
            .iter()
            .filter(|s| gone.contains(&&s.master.proxy_id))
            .map(|s| s.id)
            .collect();
        if let Some(a) = c.slots.iter().find(|a| {
            removed.contains(&a.shard)
                || a.migration
                    .as_ref()
                    .is_some_and(|m| removed.contains(&m.target_shard))
        }) {
            return Err(ModelError::FailedPrecondition(format!(
                "cannot remove the chunk(s): slots {} still belong to or move to one of their shards",
                a.range
            )));
        }
        c.shards.retain(|s| !removed.contains(&s.id));
        // A replica on a leaving proxy replicates a staying master only
        // after a failover mixed chunks; it goes with its proxy.
        for s in &mut c.shards {
            s.replicas.retain(|r| !gone.contains(&&r.proxy_id));
        }
        c.chunks.retain(|ch| !chunks.contains(ch));
        if c.chunks.is_empty() {
            return Err(ModelError::FailedPrecondition(
                "a cluster keeps at least one chunk".into(),
            ));
        }
        c.check()?;
        Ok(c)
    }

    /// The chunks a finished task takes out: those it recorded (`recorded`)
    /// as they are now. A replacement during the task puts a new proxy in a
    /// recorded chunk, so a chunk also leaves if every shard it masters is
    /// one the task emptied (`emptied`) and none of them owns or receives a
    /// slot any more; a chunk that still holds slots always stays.
    pub fn leaving_chunks(&self, recorded: &[Chunk], emptied: &[ShardId]) -> Vec<Chunk> {
        let holds_slots = |id: ShardId| {
            self.slots.iter().any(|a| {
                a.shard == id || a.migration.as_ref().is_some_and(|m| m.target_shard == id)
            })
        };
        self.chunks
            .iter()
            .filter(|ch| {
                let hosted = self.shards_on(std::slice::from_ref(*ch));
                recorded.contains(ch)
                    || (!hosted.is_empty()
                        && hosted
                            .iter()
                            .all(|id| emptied.contains(id) && !holds_slots(*id)))
            })
            .cloned()
            .collect()
    }

    /// Shards whose master is on one of `chunks`.
    pub fn shards_on(&self, chunks: &[Chunk]) -> Vec<ShardId> {
        self.shards
            .iter()
            .filter(|s| {
                chunks
                    .iter()
                    .any(|c| c.proxies.contains(&s.master.proxy_id))
            })
            .map(|s| s.id)
            .collect()
    }

    /// Whether any slot range is being moved.
    pub fn migrating(&self) -> bool {
        self.slots.iter().any(|a| a.migration.is_some())
    }

    /// Starts moving `mv.range` (stage `Prepare`): every slot of it must be
    /// owned by `mv.from` and not moving, or already moving under `task`
    /// (the step is idempotent, so a resumed task can repeat it).
    pub fn begin_move(&self, mv: &Move, task: &str) -> Result<Cluster, ModelError> {
        if self.shard(mv.to).is_none() || self.shard(mv.from).is_none() {
            return Err(ModelError::FailedPrecondition(format!(
                "move of {} from shard {} to {}: a shard no longer exists",
                mv.range, mv.from, mv.to
            )));
        }
        let mut c = self.clone();
        isolate(&mut c.slots, mv.range);
        for a in c.slots.iter_mut().filter(|a| overlaps(a.range, mv.range)) {
            match &a.migration {
                None if a.shard == mv.from => {
                    a.migration = Some(SlotMigration {
                        target_shard: mv.to,
                        task_id: task.to_owned(),
                        stage: MigrationStage::Prepare,
                    })
                }
                Some(m) if m.task_id == task && a.shard == mv.from && m.target_shard == mv.to => {}
                _ => {
                    return Err(ModelError::FailedPrecondition(format!(
                        "slots {} are not owned by shard {} alone (owner {}, moving: {})",
                        a.range,
                        mv.from,
                        a.shard,
                        a.migration.is_some()
                    )))
                }
            }
        }
        c.check()?;
        Ok(c)
    }

    /// Sets the stage of `task`'s move of `range`.
    pub fn set_move_stage(
        &self,
        range: SlotRange,
        task: &str,
        stage: MigrationStage,
    ) -> Result<Cluster, ModelError> {
        let mut c = self.clone();
        for a in c.slots.iter_mut().filter(|a| overlaps(a.range, range)) {
            match &mut a.migration {
                Some(m) if m.task_id == task => m.stage = stage,
                _ => {
                    return Err(ModelError::FailedPrecondition(format!(
                        "slots {} are not being moved by task {task}",
                        a.range
                    )))
                }
            }
        }
        Ok(c)
    }

    /// Turns `task`'s move `mv` around mid-way, for a cancel: the
    /// destination becomes the owner, moving the range back to the source,
    /// at stage `Move`. Every key stays where it is, in one place, and a
    /// proxy on either view finds it (the owner serves the keys it holds and
    /// sends the rest on with `-ASK`), so only the keys that already moved
    /// have to move back. Repeating it changes nothing; a move that reached
    /// `Commit` is finished instead.
    pub fn turn_back_move(&self, mv: &Move, task: &str) -> Result<Cluster, ModelError> {
        let mut c = self.clone();
        isolate(&mut c.slots, mv.range);
        for a in c.slots.iter_mut().filter(|a| overlaps(a.range, mv.range)) {
            match &mut a.migration {
                Some(m)
                    if m.task_id == task
                        && m.stage != MigrationStage::Commit
                        && a.shard == mv.from
                        && m.target_shard == mv.to =>
                {
                    a.shard = mv.to;
                    m.target_shard = mv.from;
                    m.stage = MigrationStage::Move;
                }
                Some(m) if m.task_id == task && a.shard == mv.to && m.target_shard == mv.from => {}
                _ => {
                    return Err(ModelError::FailedPrecondition(format!(
                        "slots {} are not being moved from shard {} to {} by task {task}",
                        a.range, mv.from, mv.to
                    )))
                }
            }
        }
        c.check()?;
        Ok(c)
    }

    /// Ends `task`'s move of `range`: the destination owns the slots when
    /// `done`, else (an abandoned prepare) the source keeps them. Slots no
    /// longer marked (a repeated step) are left as they are.
    pub fn end_move(&self, range: SlotRange, task: &str, done: bool) -> Cluster {
        let mut c = self.clone();
        for a in c.slots.iter_mut().filter(|a| overlaps(a.range, range)) {
            if let Some(m) = a.migration.take_if(|m| m.task_id == task) {
                if done {
                    a.shard = m.target_shard;
                }
            }
        }
        merge(&mut c.slots);
        c
    }
}

fn overlaps(a: SlotRange, b: SlotRange) -> bool {
    a.start() <= b.end() && b.start() <= a.end()
}

/// Splits assignments so that `range` starts and ends on boundaries.
fn isolate(slots: &mut Vec<SlotAssignment>, range: SlotRange) {
    for cut in [range.start(), range.end().saturating_add(1)] {
        if cut == 0 || cut >= SLOT_COUNT {
            continue;
        }
        if let Some(i) = slots
            .iter()
            .position(|a| a.range.start() < cut && cut <= a.range.end())
        {
            let a = slots[i].clone();
            let (Ok(left), Ok(right)) = (
                SlotRange::new(a.range.start().into(), u32::from(cut) - 1),
                SlotRange::new(cut.into(), a.range.end().into()),
            ) else {
                continue;
            };
            slots[i].range = left;
            slots.insert(i + 1, SlotAssignment { range: right, ..a });
        }
    }
}

/// Joins neighbouring assignments that say the same thing.
fn merge(slots: &mut Vec<SlotAssignment>) {
    let mut out: Vec<SlotAssignment> = Vec::with_capacity(slots.len());
    for a in slots.drain(..) {
        match out.last_mut() {
            Some(last) if last.shard == a.shard && last.migration == a.migration => {
                if let Ok(r) = SlotRange::new(last.range.start().into(), a.range.end().into()) {
                    last.range = r;
                }
            }
            _ => out.push(a),
        }
    }
    *slots = out;
}

/// The moves that spread the slots evenly over the shards that stay (all
/// but those on `leaving`): leaving shards give everything, shards above
/// their share give their highest slots, and shards below it receive, in
/// shard order. Shares differ by at most one slot, older shards first.
pub fn plan_moves(cluster: &Cluster, leaving: &[Chunk]) -> Result<Vec<Move>, ModelError> {
    if cluster.migrating() {
        return Err(ModelError::FailedPrecondition(format!(
            "cluster {} is already moving slots",
            cluster.name
        )));
    }
    let gone = cluster.shards_on(leaving);
    let mut keep: Vec<ShardId> = cluster
        .shards
        .iter()
        .map(|s| s.id)
        .filter(|id| !gone.contains(id))
        .collect();
    keep.sort_unstable();
    if keep.is_empty() {
        return Err(ModelError::FailedPrecondition(
            "no shard would be left to hold the slots".into(),
        ));
    }
    let mut owned: BTreeMap<ShardId, Vec<Slot>> = BTreeMap::new();
    for a in &cluster.slots {
        owned.entry(a.shard).or_default().extend(a.range.slots());
    }
    let total = usize::from(SLOT_COUNT);
    let (base, extra) = (total / keep.len(), total % keep.len());
    let share = |i: usize| base + usize::from(i < extra);
    // Slots given away, in donor order.
    let mut given: Vec<(ShardId, Slot)> = Vec::new();
    for (id, slots) in &owned {
        let keep_n = match keep.iter().position(|k| k == id) {
            Some(i) => share(i).min(slots.len()),
            None => 0,
        };
        given.extend(slots[keep_n..].iter().map(|s| (*id, *s)));
    }
    let mut moves: Vec<(ShardId, ShardId, Slot)> = Vec::new();
    let mut next = given.into_iter();
    for (i, id) in keep.iter().enumerate() {
        let have = owned.get(id).map_or(0, Vec::len);
        for _ in have..share(i) {
            if let Some((from, slot)) = next.next() {
                moves.push((from, *id, slot));
            }
        }
    }
    // Contiguous runs per (from, to), in slot order.
    let mut by_pair: BTreeMap<(ShardId, ShardId), Vec<Slot>> = BTreeMap::new();
    for (from, to, slot) in moves {
        by_pair.entry((from, to)).or_default().push(slot);
    }
    let mut out: Vec<Move> = by_pair
        .into_iter()
        .flat_map(|((from, to), mut slots)| {
            slots.sort_unstable();
            ranges_from_sorted(slots)
                .into_iter()
                .map(move |range| Move { range, from, to })
        })
        .collect();
    out.sort_by_key(|m| m.range);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::{ClusterConfig, ClusterName};

    fn pid(s: &str) -> ProxyId {
        ProxyId::parse(s).unwrap()
    }

    fn chunk(a: &str, b: &str) -> Chunk {
        Chunk {
            proxies: [pid(a), pid(b)],
        }
    }

    fn cluster(chunks: Vec<Chunk>) -> Cluster {
        Cluster::new_layout(
            ClusterName::parse("c").unwrap(),
            "uid".into(),
            "secret".into(),
            ClusterConfig::default(),
            chunks,
            1,
            SystemTime::UNIX_EPOCH,
        )
        .unwrap()
    }

    fn run(c: &Cluster, moves: &[Move]) -> Cluster {
        let mut c = c.clone();
        for m in moves {
            c = c.begin_move(m, "t").unwrap();
            c = c
                .set_move_stage(m.range, "t", MigrationStage::Move)
                .unwrap();
            c = c.end_move(m.range, "t", true);
            c.check().unwrap();
        }
        c
    }

    fn counts(c: &Cluster) -> BTreeMap<ShardId, usize> {
        let mut out = BTreeMap::new();
        for a in &c.slots {
            *out.entry(a.shard).or_insert(0) += a.range.len();
        }
        out
    }

    #[test]
    fn a_move_turned_back_mid_way_moves_back_to_its_source() {
        let big = cluster(vec![chunk("a", "b")])
            .with_chunks(&[chunk("c", "d")])
            .unwrap();
        let m = plan_moves(&big, &[]).unwrap()[0].clone();
        let moving = big
            .begin_move(&m, "t")
            .unwrap()
            .set_move_stage(m.range, "t", MigrationStage::Move)
            .unwrap();
        let back = moving.turn_back_move(&m, "t").unwrap();
        let a = back.assignment_of(m.range.start()).unwrap();
        assert_eq!(a.shard, m.to);
        let mig = a.migration.as_ref().unwrap();
        assert_eq!(
            (mig.target_shard, mig.stage),
            (m.from, MigrationStage::Move)
        );
        assert_eq!(back.turn_back_move(&m, "t").unwrap(), back, "repeated");
        assert!(back.shard_owns_slots(m.to));
        // Moved back, the source owns the range again.
        assert_eq!(
            counts(&back.end_move(m.range, "t", true)),
            counts(&big),
            "the slots went back"
        );
        // A committed move is not turned around.
        let committed = moving
            .set_move_stage(m.range, "t", MigrationStage::Commit)
            .unwrap();
        assert!(committed.turn_back_move(&m, "t").is_err());
    }

    #[test]
    fn a_shard_owns_slots_once_a_move_into_it_commits() {
        let big = cluster(vec![chunk("a", "b")])
            .with_chunks(&[chunk("c", "d")])
            .unwrap();
        assert!(big.shard_owns_slots(0));
        assert!(!big.shard_owns_slots(2));
        let m = &plan_moves(&big, &[]).unwrap()[0];
        assert_eq!(m.to, 2);
        let mut c = big.begin_move(m, "t").unwrap();
        for stage in [MigrationStage::Prepare, MigrationStage::Move] {
            c = c.set_move_stage(m.range, "t", stage).unwrap();
            assert!(!c.shard_owns_slots(2), "{stage:?}");
        }
        c = c
            .set_move_stage(m.range, "t", MigrationStage::Commit)
            .unwrap();
        assert!(c.shard_owns_slots(2));
        assert!(c.end_move(m.range, "t", true).shard_owns_slots(2));
        assert!(!c.end_move(m.range, "t", false).shard_owns_slots(2));
    }

    #[test]
    fn scale_out_halves_each_shard_and_scale_in_restores_it() {
        let small = cluster(vec![chunk("a", "b")]);
        let big = small.with_chunks(&[chunk("c", "d")]).unwrap();
        assert_eq!(big.shards.len(), 4);
        let moves = plan_moves(&big, &[]).unwrap();
        assert_eq!(
            moves,
            vec![
                Move {
                    range: SlotRange::new(4096, 8191).unwrap(),
                    from: 0,
                    to: 2
                },
                Move {
                    range: SlotRange::new(12288, 16383).unwrap(),
                    from: 1,
                    to: 3
                },
            ]
        );
        let grown = run(&big, &moves);
        assert!(counts(&grown).values().all(|n| *n == 4096));
        assert!(plan_moves(&grown, &[]).unwrap().is_empty());

        let leaving = [chunk("c", "d")];
        let back = plan_moves(&grown, &leaving).unwrap();
        let shrunk = run(&grown, &back).without_chunks(&leaving).unwrap();
        assert_eq!(shrunk.slots, small.slots);
        assert_eq!(shrunk.chunks, small.chunks);
    }

    #[test]
    fn a_leaving_chunk_whose_member_was_replaced_still_leaves() {
        let grown = {
            let big = cluster(vec![chunk("a", "b")])
                .with_chunks(&[chunk("c", "d")])
                .unwrap();
            run(&big, &plan_moves(&big, &[]).unwrap())
        };
        let leaving = [chunk("c", "d")];
        let back = plan_moves(&grown, &leaving).unwrap();
        let emptied: Vec<ShardId> = back.iter().map(|m| m.from).collect();
        // Mid-task, "d" fails and "e" takes its place.
        let failed = crate::failover::fail_proxy(&grown, &pid("d"), |_| true)
            .unwrap()
            .cluster;
        let replaced = crate::failover::replace_proxy(&failed, &pid("d"), &pid("e")).unwrap();
        // Before the moves the chunk still holds slots: it stays.
        assert!(replaced.leaving_chunks(&leaving, &emptied).is_empty());
        let shrunk = run(&replaced, &back);
        let gone = shrunk.leaving_chunks(&leaving, &emptied);
        assert_eq!(gone, vec![chunk("c", "e")]);
        let small = shrunk.without_chunks(&gone).unwrap();
        assert_eq!(small.chunks, vec![chunk("a", "b")]);
        // A staying chunk whose shards also gave slots away is not taken.
        assert!(!grown
            .leaving_chunks(&[], &[0, 1, 2, 3])
            .contains(&chunk("a", "b")));
    }

    #[test]
    fn uneven_counts_spread_within_one_slot() {
        let c = cluster(vec![chunk("a", "b")])
            .with_chunks(&[chunk("c", "d"), chunk("e", "f")])
            .unwrap();
        let done = run(&c, &plan_moves(&c, &[]).unwrap());
        let n = counts(&done);
        assert_eq!(n.len(), 6);
        let (min, max) = (n.values().min().unwrap(), n.values().max().unwrap());
        assert!(max - min <= 1, "{n:?}");
        assert_eq!(n.values().sum::<usize>(), 16384);
    }

    #[test]
    fn steps_are_checked_and_repeatable() {
        let c = cluster(vec![chunk("a", "b")])
            .with_chunks(&[chunk("c", "d")])
            .unwrap();
        let m = &plan_moves(&c, &[]).unwrap()[0];
        let started = c.begin_move(m, "t").unwrap();
        assert_eq!(started.begin_move(m, "t").unwrap(), started);
        assert!(started.begin_move(m, "other").is_err());
        assert!(plan_moves(&started, &[]).is_err());
        assert!(started
            .set_move_stage(m.range, "other", MigrationStage::Move)
            .is_err());
        // The shard of a leaving chunk cannot go while a move targets it.
        assert!(started.without_chunks(&[chunk("c", "d")]).is_err());
        let undone = started.end_move(m.range, "t", false);
        assert_eq!(undone.slots, c.slots);
        let done = started.end_move(m.range, "t", true);
        assert_eq!(done.end_move(m.range, "t", true), done);
    }
}
