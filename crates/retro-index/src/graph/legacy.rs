//! Databases built before `graph.links` hold an hnsw_rs dump (`graph.hnsw.graph`, `.hnsw.data`).
//! Their links are read into a [`Graph`], so they open and answer as before without a rebuild.

use super::Graph;
use crate::distance::DistUnitDot;
use hnsw_rs::prelude::Hnsw;

/// The links of `hnsw`, whose data ids must be exactly `0..n`, with lists of `m` (`2m` on layer 0).
/// `Err` says why the dump cannot be read this way.
pub(crate) fn from_hnsw_rs(
    hnsw: &Hnsw<'_, f32, DistUnitDot>,
    m: usize,
) -> std::result::Result<Graph, String> {
    let n = hnsw.get_nb_point();
    if n > u32::MAX as usize {
        return Err(format!("{n} points do not fit 32-bit ids"));
    }
    let mut levels = vec![0u8; n];
    let mut seen = vec![false; n];
    for p in hnsw.get_point_indexation() {
        let id = p.get_origin_id();
        if id >= n || seen[id] {
            return Err(format!("point id {id} is repeated or not below {n}"));
        }
        seen[id] = true;
        levels[id] = p.get_point_id().0.min(super::MAX_LEVEL as u8);
    }
    if let Some(missing) = seen.iter().position(|s| !s) {
        return Err(format!("no point has id {missing}"));
    }
    let graph = Graph::empty(m, levels);
    for p in hnsw.get_point_indexation() {
        let id = p.get_origin_id() as u32;
        for (l, layer) in p
            .get_neighborhood_id()
            .iter()
            .enumerate()
            .take(graph.level(id) + 1)
        {
            let ids: Vec<u32> = layer
                .iter()
                .map(|nb| nb.d_id)
                .filter(|&x| x < n && graph.level(x as u32) >= l)
                .map(|x| x as u32)
                .take(graph.capacity(l))
                .collect();
            graph.set_links(id, l, ids.into_iter());
        }
    }
    Ok(graph)
}
