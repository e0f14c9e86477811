//! How the ranks of a new communicator get its NCCL unique id: the id
//! itself, the torchrun-style TCP rendezvous (rank 0 serves the id on
//! `MASTER_PORT`), and the broadcast over MPI (features `cuda` and `mpi`).

use std::ffi::c_char;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use cudarc::nccl::result as nccl;
use cudarc::nccl::sys;

use super::engine::check_rank;
use super::errors::{engine_error, guarded, nccl_error};
use super::libs::{CudaLibrary, check_libraries, device_count};
use super::{NcclComm, NcclEngine};
use crate::CommError;

/// A 128-byte `ncclUniqueId`: created by one rank, sent to every rank of the
/// new communicator by the launcher.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct UniqueId([u8; 128]);

impl std::fmt::Debug for UniqueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UniqueId({:02x?}..)", &self.0[..8])
    }
}

impl UniqueId {
    /// A new id (`ncclGetUniqueId`; it opens the bootstrap socket of the new
    /// communicator on this process).
    pub fn new() -> Result<UniqueId, CommError> {
        check_libraries(&[CudaLibrary::Nccl])?;
        guarded("ncclGetUniqueId", || {
            let id = nccl::get_uniqueid().map_err(|e| nccl_error("ncclGetUniqueId", e, None))?;
            Ok(UniqueId(id.internal.map(|c| c as u8)))
        })
    }

    /// An id received from the rank that created it.
    pub fn from_bytes(bytes: [u8; 128]) -> UniqueId {
        UniqueId(bytes)
    }

    /// The bytes to send to the other ranks.
    pub fn as_bytes(&self) -> &[u8; 128] {
        &self.0
    }

    pub(super) fn to_sys(self) -> sys::ncclUniqueId {
        sys::ncclUniqueId {
            internal: self.0.map(|b| b as c_char),
        }
    }
}

/// How the processes of a job start one communicator: rank 0 makes the id,
/// the others receive it.
impl NcclEngine {
    /// Torchrun-style start: `RANK`, `WORLD_SIZE`, `MASTER_ADDR` and
    /// `MASTER_PORT` from the environment; the device is `LOCAL_RANK` if set,
    /// else `RANK` modulo the number of visible devices. See
    /// [`NcclEngine::rendezvous`].
    pub fn from_env(&self) -> Result<NcclComm, CommError> {
        fn var(name: &str) -> Result<String, CommError> {
            std::env::var(name).map_err(|_| {
                CommError::InvalidArgument(format!(
                    "nccl engine: environment variable {name} is not set (launch with torchrun, \
                     or set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT)"
                ))
            })
        }
        fn number(name: &str, value: &str) -> Result<usize, CommError> {
            value.trim().parse().map_err(|_| {
                CommError::InvalidArgument(format!("nccl engine: {name}={value:?} is not a number"))
            })
        }
        let rank = number("RANK", &var("RANK")?)?;
        let world = number("WORLD_SIZE", &var("WORLD_SIZE")?)?;
        let addr = std::env::var("MASTER_ADDR").unwrap_or_else(|_| "127.0.0.1".into());
        let port = number("MASTER_PORT", &var("MASTER_PORT")?)?;
        let device = match std::env::var("LOCAL_RANK") {
            Ok(local) => number("LOCAL_RANK", &local)?,
            Err(_) => rank % device_count()?.max(1),
        };
        self.rendezvous(&format!("{addr}:{port}"), rank, world, device)
    }

    /// Multi-process start over TCP: rank 0 creates the unique id, listens on
    /// the port of `master` (`host:port`) and sends the id to each of the
    /// other `world - 1` ranks, which connect (retrying until the timeout).
    pub fn rendezvous(
        &self,
        master: &str,
        rank: usize,
        world: usize,
        device: usize,
    ) -> Result<NcclComm, CommError> {
        check_rank(rank, world)?;
        let id = if rank == 0 {
            let id = UniqueId::new()?;
            serve_id(master, world, id, self.timeout)?;
            id
        } else {
            fetch_id(master, rank, world, self.timeout)?
        };
        self.init_rank(id, rank, world, device)
    }
}

#[cfg(feature = "mpi")]
impl NcclEngine {
    /// Multi-process start through MPI (features `cuda` and `mpi`): rank 0 of
    /// `comm` creates the unique id and broadcasts it over MPI; every rank of
    /// `comm` then joins the NCCL communicator with the same rank and size,
    /// on CUDA device `device` (e.g. `OMPI_COMM_WORLD_LOCAL_RANK`). MPI must
    /// be initialised by the caller. Collective over `comm`: if rank 0 cannot
    /// create the id, every rank gets an error instead of hanging.
    pub fn from_mpi<C: ::mpi::traits::Communicator>(
        &self,
        comm: &C,
        device: usize,
    ) -> Result<NcclComm, CommError> {
        use ::mpi::traits::Root;
        let rank = comm.rank() as usize;
        let size = comm.size() as usize;
        let local = check_libraries(&super::ENGINE_LIBRARIES);
        // 128 id bytes, then 1 if rank 0 created the id.
        let mut message = [0u8; 129];
        let mut root_error = None;
        if rank == 0 {
            match local.clone().and_then(|_| UniqueId::new()) {
                Ok(id) => {
                    message[..128].copy_from_slice(id.as_bytes());
                    message[128] = 1;
                }
                Err(err) => root_error = Some(err),
            }
        }
        comm.process_at_rank(0).broadcast_into(&mut message[..]);
        if let Some(err) = root_error {
            return Err(err);
        }
        local?;
        if message[128] != 1 {
            return Err(engine_error(
                "rank 0 could not create the NCCL unique id (see its error)",
            ));
        }
        let id: [u8; 128] = message[..128].try_into().expect("128 bytes");
        self.init_rank(UniqueId(id), rank, size, device)
    }
}

const HELLO: &[u8; 8] = b"MICSNCCL";

fn io_error(what: &str, master: &str, err: std::io::Error) -> CommError {
    engine_error(format!("rendezvous with {master}: {what}: {err}"))
}

/// Rank 0: accepts `world - 1` connections and sends each the id.
fn serve_id(master: &str, world: usize, id: UniqueId, timeout: Duration) -> Result<(), CommError> {
    if world == 1 {
        return Ok(());
    }
    let port = master
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok())
        .ok_or_else(|| CommError::InvalidArgument(format!("bad master address {master:?}")))?;
    let listener = TcpListener::bind(("0.0.0.0", port))
        .map_err(|e| io_error(&format!("rank 0 cannot listen on port {port}"), master, e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| io_error("listen", master, e))?;
    let deadline = Instant::now() + timeout;
    let mut served = vec![false; world];
    served[0] = true;
    while served.iter().any(|s| !s) {
        match listener.accept() {
            Ok((mut stream, _)) => {
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                let mut hello = [0u8; 24];
                if stream.read_exact(&mut hello).is_err() || &hello[..8] != HELLO {
                    continue; // Not one of ours: ignore it.
                }
                let peer_rank = u64::from_le_bytes(hello[8..16].try_into().expect("8 bytes"));
                let peer_world = u64::from_le_bytes(hello[16..24].try_into().expect("8 bytes"));
                if peer_world != world as u64 || peer_rank == 0 || peer_rank >= world as u64 {
                    return Err(CommError::InvalidArgument(format!(
                        "rendezvous on {master}: a rank says it is rank {peer_rank} of \
                         {peer_world}, but rank 0 has WORLD_SIZE={world}"
                    )));
                }
                stream
                    .write_all(id.as_bytes())
                    .map_err(|e| io_error("sending the NCCL id", master, e))?;
                served[peer_rank as usize] = true;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<usize> = (0..world).filter(|&r| !served[r]).collect();
                    return Err(engine_error(format!(
                        "rendezvous on {master}: ranks {missing:?} did not connect within \
                         {timeout:?}"
                    )));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(io_error("accept", master, e)),
        }
    }
    Ok(())
}

/// Ranks > 0: connects to rank 0 (retrying) and receives the id.
fn fetch_id(
    master: &str,
    rank: usize,
    world: usize,
    timeout: Duration,
) -> Result<UniqueId, CommError> {
    let deadline = Instant::now() + timeout;
    loop {
        let attempt = (|| -> std::io::Result<UniqueId> {
            let addr = master.to_socket_addrs()?.next().ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::NotFound, "no address for the host")
            })?;
            let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            stream.set_read_timeout(Some(timeout))?;
            let mut hello = [0u8; 24];
            hello[..8].copy_from_slice(HELLO);
            hello[8..16].copy_from_slice(&(rank as u64).to_le_bytes());
            hello[16..24].copy_from_slice(&(world as u64).to_le_bytes());
            stream.write_all(&hello)?;
            let mut id = [0u8; 128];
            stream.read_exact(&mut id)?;
            Ok(UniqueId(id))
        })();
        match attempt {
            Ok(id) => return Ok(id),
            Err(e) if Instant::now() >= deadline => {
                return Err(io_error(
                    &format!("rank {rank} got no NCCL id from rank 0 within {timeout:?}"),
                    master,
                    e,
                ));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendezvous_sends_the_id_over_tcp() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let master = format!("127.0.0.1:{port}");
        let id = UniqueId([42; 128]);
        let timeout = Duration::from_secs(20);
        let server = {
            let master = master.clone();
            std::thread::spawn(move || serve_id(&master, 3, id, timeout))
        };
        let clients: Vec<_> = (1..3)
            .map(|rank| {
                let master = master.clone();
                std::thread::spawn(move || fetch_id(&master, rank, 3, timeout))
            })
            .collect();
        for c in clients {
            assert_eq!(c.join().unwrap().unwrap(), id);
        }
        server.join().unwrap().unwrap();
    }
}
