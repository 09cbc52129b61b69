//! Import cycles between the files of a crate.
//!
//! An edge goes from a file to the file that defines the module a path names
//! (`use crate::store::nodes::NodeRow` -> the file of `store::nodes`). A
//! module's edges to its own submodules do not count: a folder's `mod.rs`
//! declares, re-exports and dispatches to its children, and the children may
//! use what it defines. Every other edge does, so a cycle through siblings,
//! cousins or a parent's parent is reported. `#[cfg(test)]` modules are
//! left out: test code may use what sits above it.

use crate::modules::Crate;
use std::collections::BTreeSet;

/// One file-to-file edge, with the line of its first occurrence.
#[derive(Clone, Copy)]
pub struct Edge {
    pub to: usize,
    pub line: usize,
}

pub fn edges(krate: &Crate) -> Vec<Vec<Edge>> {
    krate
        .files
        .iter()
        .enumerate()
        .map(|(i, file)| {
            let mut seen = BTreeSet::new();
            let mut out = Vec::new();
            for (path, line) in &file.refs {
                let Some(to) = krate.file_of(path) else {
                    continue;
                };
                let target = &krate.files[to].module;
                if to == i || target.starts_with(&file.module) || !seen.insert(to) {
                    continue;
                }
                out.push(Edge { to, line: *line });
            }
            out
        })
        .collect()
}

/// The strongly connected components with more than one file (Tarjan).
pub fn cycles(graph: &[Vec<Edge>]) -> Vec<Vec<usize>> {
    struct State<'g> {
        graph: &'g [Vec<Edge>],
        index: Vec<Option<usize>>,
        low: Vec<usize>,
        on_stack: Vec<bool>,
        stack: Vec<usize>,
        next: usize,
        out: Vec<Vec<usize>>,
    }
    fn connect(s: &mut State, v: usize) {
        s.index[v] = Some(s.next);
        s.low[v] = s.next;
        s.next += 1;
        s.stack.push(v);
        s.on_stack[v] = true;
        for e in &s.graph[v] {
            match s.index[e.to] {
                None => {
                    connect(s, e.to);
                    s.low[v] = s.low[v].min(s.low[e.to]);
                }
                Some(i) if s.on_stack[e.to] => s.low[v] = s.low[v].min(i),
                Some(_) => {}
            }
        }
        if Some(s.low[v]) == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack[w] = false;
                component.push(w);
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.out.push(component);
            }
        }
    }
    let n = graph.len();
    let mut s = State {
        graph,
        index: vec![None; n],
        low: vec![0; n],
        on_stack: vec![false; n],
        stack: Vec::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in 0..n {
        if s.index[v].is_none() {
            connect(&mut s, v);
        }
    }
    s.out
}

/// One closed walk through `component`, as file indices with the line of
/// each edge, to show the reader where the cycle is.
pub fn witness(graph: &[Vec<Edge>], component: &[usize]) -> Vec<(usize, usize)> {
    let inside = |v: usize| component.binary_search(&v).is_ok();
    let start = component[0];
    // Breadth-first from each successor of start back to start.
    let mut prev: Vec<Option<(usize, usize)>> = vec![None; graph.len()];
    let mut queue = std::collections::VecDeque::from([start]);
    let mut seen = BTreeSet::from([start]);
    while let Some(v) = queue.pop_front() {
        for e in &graph[v] {
            if !inside(e.to) {
                continue;
            }
            if e.to == start {
                let mut walk = vec![(v, e.line)];
                let mut at = v;
                while let Some((p, line)) = prev[at] {
                    walk.push((p, line));
                    at = p;
                }
                walk.reverse();
                return walk;
            }
            if seen.insert(e.to) {
                prev[e.to] = Some((v, e.line));
                queue.push_back(e.to);
            }
        }
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(edges: &[(usize, usize)], n: usize) -> Vec<Vec<Edge>> {
        let mut g = vec![Vec::new(); n];
        for &(a, b) in edges {
            g[a].push(Edge { to: b, line: 1 });
        }
        g
    }

    #[test]
    fn finds_a_three_file_cycle_and_nothing_in_a_chain() {
        let g = graph(&[(0, 1), (1, 2), (2, 0), (2, 3)], 4);
        assert_eq!(cycles(&g), vec![vec![0, 1, 2]]);
        let walk = witness(&g, &[0, 1, 2]);
        assert_eq!(walk.iter().map(|w| w.0).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert!(cycles(&graph(&[(0, 1), (1, 2), (0, 2)], 3)).is_empty());
    }
}
