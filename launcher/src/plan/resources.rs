//! Which slots (GPUs or CPU ranks) of which hosts a job uses: DeepSpeed's
//! `--include/--exclude` syntax (`host[:slot,slot]@host`), `--num_nodes`, `--num_gpus`,
//! `CUDA_VISIBLE_DEVICES` as the local include list, and CUDA device discovery through a
//! dynamically loaded driver (no CUDA at build time). Contract: DeepSpeed's `runner.py`
//! rules for `--include`/`--exclude` and `CUDA_VISIBLE_DEVICES`.

/// Hosts in rank order, each with its sorted, de-duplicated slot ids.
pub type ResourcePool = Vec<(String, Vec<usize>)>;

/// Why a resource selection was refused (DeepSpeed's messages where it has one).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResourceError {
    #[error("include_str and exclude_str are mutually exclusive.")]
    IncludeAndExclude,
    #[error("Cannot specify num_nodes/gpus with include/exclude")]
    CountsWithFilter,
    #[error("Hostname '{0}' not found in hostfile")]
    UnknownHost(String),
    #[error("No slot '{slot}' specified on host '{host}'")]
    UnknownSlot { host: String, slot: usize },
    #[error("invalid slot '{slot}' in '{spec}': slots are non-negative integers")]
    BadSlot { spec: String, slot: String },
    #[error("Unable to proceed, no GPU resources available")]
    NoResources,
    #[error("invalid CUDA_VISIBLE_DEVICES='{0}': expected comma-separated device indices")]
    BadVisibleDevices(String),
}

/// Applies `--include` or `--exclude` to `pool`, exactly like DeepSpeed's
/// `parse_resource_filter`: include lists define a host's slots, exclude removes them,
/// slots end sorted and unique, empty hosts are dropped, host order is the pool's.
pub fn filter_resources(
    pool: &ResourcePool,
    include: &str,
    exclude: &str,
) -> Result<ResourcePool, ResourceError> {
    if !include.is_empty() && !exclude.is_empty() {
        return Err(ResourceError::IncludeAndExclude);
    }
    if include.is_empty() && exclude.is_empty() {
        return Ok(pool.clone());
    }
    let including = !include.is_empty();
    let spec = if including { include } else { exclude };
    let mut chosen: ResourcePool = if including { Vec::new() } else { pool.clone() };
    for node_spec in spec.split('@') {
        let (host, slots) = parse_node_spec(node_spec)?;
        let available = pool_slots(pool, &host)?;
        if let Some(&slot) = slots.iter().flatten().find(|s| !available.contains(s)) {
            return Err(ResourceError::UnknownSlot { host, slot });
        }
        let entry = entry_mut(&mut chosen, &host);
        match (including, slots) {
            (true, Some(slots)) => *entry = slots,
            (true, None) => *entry = available.clone(),
            (false, Some(slots)) => entry.retain(|s| !slots.contains(s)),
            (false, None) => entry.clear(),
        }
    }
    Ok(normalize(pool, chosen))
}

/// `NAME[:SLOT[,SLOT...]]` -> host and optional slot list.
fn parse_node_spec(node_spec: &str) -> Result<(String, Option<Vec<usize>>), ResourceError> {
    let Some((host, list)) = node_spec.split_once(':') else {
        return Ok((node_spec.to_string(), None));
    };
    let slots = list
        .split(',')
        .map(|s| {
            s.trim()
                .parse::<usize>()
                .map_err(|_| ResourceError::BadSlot {
                    spec: node_spec.to_string(),
                    slot: s.to_string(),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((host.to_string(), Some(slots)))
}

fn pool_slots<'a>(pool: &'a ResourcePool, host: &str) -> Result<&'a Vec<usize>, ResourceError> {
    pool.iter()
        .find(|(h, _)| h == host)
        .map(|(_, s)| s)
        .ok_or_else(|| ResourceError::UnknownHost(host.to_string()))
}

fn entry_mut<'a>(chosen: &'a mut ResourcePool, host: &str) -> &'a mut Vec<usize> {
    let index = match chosen.iter().position(|(h, _)| h == host) {
        Some(i) => i,
        None => {
            chosen.push((host.to_string(), Vec::new()));
            chosen.len() - 1
        }
    };
    &mut chosen[index].1
}

/// Sorts and de-duplicates slots, drops empty hosts, restores the pool's host order.
fn normalize(pool: &ResourcePool, mut chosen: ResourcePool) -> ResourcePool {
    for (_, slots) in chosen.iter_mut() {
        slots.sort_unstable();
        slots.dedup();
    }
    pool.iter()
        .filter_map(|(host, _)| chosen.iter().find(|(h, _)| h == host).cloned())
        .filter(|(_, slots)| !slots.is_empty())
        .collect()
}

/// `--num_nodes N` keeps the first N hosts; `--num_gpus/--num_procs K` gives every kept
/// host the slots `0..K`. Refused together with include/exclude, like DeepSpeed.
pub fn limit_resources(
    pool: ResourcePool,
    num_nodes: Option<usize>,
    slots_per_node: Option<usize>,
    filtered: bool,
) -> Result<ResourcePool, ResourceError> {
    if filtered && (num_nodes.is_some() || slots_per_node.is_some()) {
        return Err(ResourceError::CountsWithFilter);
    }
    let keep = num_nodes.unwrap_or(pool.len());
    Ok(pool
        .into_iter()
        .take(keep)
        .map(|(host, slots)| match slots_per_node {
            Some(k) => (host, (0..k).collect()),
            None => (host, slots),
        })
        .collect())
}

/// Parses `CUDA_VISIBLE_DEVICES` (`"0,2,5"`) into device indices.
pub fn parse_visible_devices(value: &str) -> Result<Vec<usize>, ResourceError> {
    value
        .split(',')
        .map(|s| s.trim().parse::<usize>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| ResourceError::BadVisibleDevices(value.to_string()))
}

/// What to do with a set `CUDA_VISIBLE_DEVICES` when no hostfile is used (DeepSpeed):
/// it becomes `--include localhost:<list>`, unless filter/count flags were given, in
/// which case it is ignored with this warning.
pub fn visible_devices_warning(value: &str) -> String {
    format!(
        "Detected VISIBLE_DEVICES={value} but ignoring it because one or several of \
         --include/--exclude/--num_gpus/--num_nodes cl args were used. If you want to use \
         CUDA_VISIBLE_DEVICES don't pass any of these arguments to rsdeep."
    )
}

/// Number of CUDA devices the driver reports, or `None` when no driver can be loaded or
/// it fails to initialise. Loads `libcuda.so.1` at run time with `dlopen`.
pub fn cuda_device_count() -> Option<usize> {
    type CuInit = unsafe extern "C" fn(u32) -> i32;
    type CuDeviceGetCount = unsafe extern "C" fn(*mut i32) -> i32;
    let names = [c"libcuda.so.1", c"libcuda.so"];
    // SAFETY: dlopen/dlsym get NUL-terminated names; the symbols are the CUDA driver API
    // entry points with the C signatures above; the library is never closed, so the
    // function pointers stay valid.
    unsafe {
        let handle = names
            .iter()
            .map(|n| libc::dlopen(n.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL))
            .find(|h| !h.is_null())?;
        let init = libc::dlsym(handle, c"cuInit".as_ptr());
        let count = libc::dlsym(handle, c"cuDeviceGetCount".as_ptr());
        if init.is_null() || count.is_null() {
            return None;
        }
        let init: CuInit = std::mem::transmute(init);
        let count_fn: CuDeviceGetCount = std::mem::transmute(count);
        if init(0) != 0 {
            return None;
        }
        let mut n = 0i32;
        (count_fn(&mut n) == 0 && n > 0).then_some(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> ResourcePool {
        vec![
            ("worker-0".into(), vec![0, 1, 2, 3]),
            ("worker-1".into(), vec![0, 1, 2, 3]),
        ]
    }

    #[test]
    fn include_whole_host_and_slots_of_another() {
        let got = filter_resources(&pool(), "worker-0@worker-1:0,2", "").unwrap();
        assert_eq!(
            got,
            vec![
                ("worker-0".to_string(), vec![0, 1, 2, 3]),
                ("worker-1".to_string(), vec![0, 2])
            ]
        );
    }

    #[test]
    fn exclude_one_slot_keeps_everything_else() {
        let got = filter_resources(&pool(), "", "worker-1:0").unwrap();
        assert_eq!(got[0].1, vec![0, 1, 2, 3]);
        assert_eq!(got[1].1, vec![1, 2, 3]);
    }

    #[test]
    fn exclude_whole_host_drops_it() {
        let got = filter_resources(&pool(), "", "worker-0").unwrap();
        assert_eq!(got, vec![("worker-1".to_string(), vec![0, 1, 2, 3])]);
    }

    #[test]
    fn include_local_gpus_sorted_unique_in_pool_order() {
        let local = vec![("localhost".to_string(), vec![0, 1, 2, 3])];
        let got = filter_resources(&local, "localhost:2,1,2", "").unwrap();
        assert_eq!(got, vec![("localhost".to_string(), vec![1, 2])]);
        let got = filter_resources(&pool(), "worker-1@worker-0:3", "").unwrap();
        assert_eq!(got[0].0, "worker-0", "host order follows the pool");
    }

    #[test]
    fn include_list_may_be_non_contiguous() {
        let got = filter_resources(&pool(), "worker-0:1,3", "").unwrap();
        assert_eq!(got, vec![("worker-0".to_string(), vec![1, 3])]);
    }

    #[test]
    fn errors_match_deepspeed() {
        let err = filter_resources(&pool(), "worker-9", "").unwrap_err();
        assert_eq!(err.to_string(), "Hostname 'worker-9' not found in hostfile");
        let err = filter_resources(&pool(), "", "worker-9:0").unwrap_err();
        assert_eq!(err, ResourceError::UnknownHost("worker-9".into()));
        let err = filter_resources(&pool(), "worker-1:7", "").unwrap_err();
        assert_eq!(err.to_string(), "No slot '7' specified on host 'worker-1'");
        let err = filter_resources(&pool(), "worker-0", "worker-1").unwrap_err();
        assert_eq!(err, ResourceError::IncludeAndExclude);
        let err = filter_resources(&pool(), "worker-0:x", "").unwrap_err();
        assert!(matches!(err, ResourceError::BadSlot { .. }), "{err}");
    }

    #[test]
    fn counts_limit_nodes_and_slots_and_refuse_filters() {
        let got = limit_resources(pool(), Some(1), Some(2), false).unwrap();
        assert_eq!(got, vec![("worker-0".to_string(), vec![0, 1])]);
        let got = limit_resources(pool(), None, None, false).unwrap();
        assert_eq!(got, pool());
        let err = limit_resources(pool(), None, Some(2), true).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Cannot specify num_nodes/gpus with include/exclude"
        );
    }

    #[test]
    fn visible_devices_parse_and_warning() {
        assert_eq!(parse_visible_devices("0, 2,5").unwrap(), vec![0, 2, 5]);
        assert!(parse_visible_devices("GPU-abc").is_err());
        assert!(parse_visible_devices("").is_err());
        assert!(visible_devices_warning("1,2").contains("VISIBLE_DEVICES=1,2 but ignoring it"));
    }
}
