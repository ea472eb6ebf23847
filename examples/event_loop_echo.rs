//! The classic tutorial echo server on the event loop
//! (`tidewire::event_loop`): greets every client, then echoes each message
//! back prefixed with "Echo: ", on one epoll thread per CPU. Open
//! `examples/echo.html` in a browser to talk to it.
//!
//! ```text
//! cargo run -p tidewire --example event_loop_echo      # ws://127.0.0.1:8080
//! ```

use tidewire::event_loop::{serve, EventLoopConfig, Handler, Incoming, Socket};
use tidewire::http::Request;
use tidewire::CloseCode;

struct Echo;

impl Handler for Echo {
    type State = ();

    fn open(&mut self, socket: &mut Socket<'_>, request: &Request<()>) {
        println!("connected: {}", request.uri());
        socket.send_text("Welcome to the WebSocket server!");
    }

    fn message(&mut self, socket: &mut Socket<'_>, _: &mut (), message: Incoming<'_>) {
        match message {
            Incoming::Text(text) => socket.send_text(&format!("Echo: {text}")),
            Incoming::Binary(data) => {
                socket.send_text(&format!("Echo: {}", String::from_utf8_lossy(data)));
            }
            _ => {}
        }
    }

    fn closed(&mut self, _: (), code: CloseCode) {
        println!("disconnected ({})", code.0);
    }
}

fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:8080".into());
    let server = serve(
        addr.parse().expect("an address such as 127.0.0.1:8080"),
        EventLoopConfig::default(),
        || Echo,
    )?;
    println!(
        "WebSocket server is running on ws://{}",
        server.local_addr()
    );
    server.join()
}
