//! What the peer echo servers share: their one flag.

/// The value of `--port P` (or `--port=P`) on the command line; exits with
/// a usage message when it is missing or not a port number.
pub fn port_arg() -> u16 {
    let args: Vec<String> = std::env::args().collect();
    let name = args.first().map(String::as_str).unwrap_or("echo");
    let mut port = None;
    let mut i = 1;
    while i < args.len() {
        if let Some(value) = args[i].strip_prefix("--port=") {
            port = value.parse().ok();
        } else if args[i] == "--port" {
            port = args.get(i + 1).and_then(|v| v.parse().ok());
            i += 1;
        } else {
            port = None;
            break;
        }
        i += 1;
    }
    match port {
        Some(port) => port,
        None => {
            eprintln!("usage: {name} --port PORT   (binds 127.0.0.1:PORT)");
            std::process::exit(2);
        }
    }
}
