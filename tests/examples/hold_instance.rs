//! Test helper: creates a namespace instance through the helper at argv[1]
//! named argv[2], prints "ready", and holds the connection (its lease)
//! until killed. Used to test that a `kill -9`ed client leaves nothing.

use warren::helper_client::HelperClient;
use warren_ipc::instance::{InstanceName, InstanceSpec};

fn main() {
    let mut args = std::env::args().skip(1);
    let socket = args.next().expect("socket path");
    let name = args.next().expect("instance name");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let mut c = HelperClient::connect(std::path::Path::new(&socket))
            .await
            .expect("connect");
        let spec = InstanceSpec::new(
            InstanceName::new(&name).expect("name"),
            1420,
            vec!["198.19.90.2/32".parse().expect("prefix")],
            vec!["0.0.0.0/0".parse().expect("prefix")],
            vec!["198.19.90.1".parse().expect("ip")],
        )
        .expect("spec");
        let (_info, _tun) = c.create_instance(spec).await.expect("create");
        println!("ready");
        std::future::pending::<()>().await;
    });
}
