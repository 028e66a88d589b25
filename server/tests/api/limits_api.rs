//! Field limits through the real server and a real gRPC client: ids are
//! bounded and printable, comments hold no control characters, and an
//! error that names user input quotes a short prefix of it (a 1 MB name
//! gets `NOT_FOUND`, not a status too large to send). Nothing refused is
//! stored whole.

use crate::common;

use flywheel_proto::v1::{ChatRequest, FeedbackHistoryRequest, FeedbackRequest, RouteRequest, Thumb, feedback_request};
use flywheel_server::Config;
use flywheel_server::config::EngineKind;
use tonic::Code;

fn thumb_up(request_id: &str) -> FeedbackRequest {
    FeedbackRequest {
        request_id: request_id.into(),
        rating: Some(feedback_request::Rating::Thumb(Thumb::Up.into())),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_ids_and_control_characters_are_refused_and_names_are_quoted_briefly() {
    let server = common::start(Config {
        engine: EngineKind::Stub,
        ..Config::default()
    });
    let id = server
        .router()
        .await
        .route(RouteRequest {
            query: "How many vacation days do I get?".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .request_id;
    let mut feedback = server.feedback().await;

    // A 3 MB reviewer id, a NUL in a request id, an escape sequence in a comment.
    let cases = [
        (
            FeedbackRequest {
                reviewer_id: Some("r".repeat(3 << 20)),
                ..thumb_up(&id)
            },
            "reviewer_id is 3145728 characters long; the limit is 256",
        ),
        (
            thumb_up(&format!("{id}\u{0}")),
            "request_id holds the control character",
        ),
        (
            FeedbackRequest {
                comment: Some("fine \u{1b}[31mred".into()),
                ..thumb_up(&id)
            },
            "comment holds the control character",
        ),
    ];
    for (request, expected) in cases {
        let e = feedback.submit(request).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
        assert!(e.message().contains(expected), "{}", e.message());
    }
    // A long unknown corrected expert is quoted briefly.
    let e = feedback
        .submit(FeedbackRequest {
            corrected_expert: Some("x".repeat(1 << 20)),
            ..thumb_up(&id)
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().len() < 1024, "{} bytes", e.message().len());
    let e = feedback
        .history(FeedbackHistoryRequest {
            request_id: "y".repeat(1000),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("request_id"), "{}", e.message());

    // A 1 MB forced expert: NOT_FOUND with a short message, and a short error in the log.
    let mut chat = server.chat().await;
    let e = chat
        .complete(ChatRequest {
            query: "Tell me about the Widget Mini".into(),
            expert: Some("z".repeat(1 << 20)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{}", e.message());
    assert!(e.message().len() < 1024, "{} bytes", e.message().len());
    let logged = server.records_with_query("Tell me about the Widget Mini").await;
    assert_eq!(logged.len(), 1);
    assert!(logged[0].error.as_ref().unwrap().len() < 1024);

    // A session id with a NUL is refused, and logged escaped.
    let e = chat
        .complete(ChatRequest {
            query: "How do I expense a client dinner?".into(),
            session_id: Some("s\u{0}1".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("session_id"), "{}", e.message());
    let logged = server.records_with_query("How do I expense a client dinner?").await;
    assert_eq!(logged.len(), 1);
    assert_eq!(logged[0].session_id.as_deref(), Some("s\\u{0}1"));

    // Valid feedback still lands, and no refused row was stored.
    feedback.submit(thumb_up(&id)).await.unwrap();
    let rows = feedback
        .history(FeedbackHistoryRequest { request_id: id.clone() })
        .await
        .unwrap()
        .into_inner()
        .feedback;
    assert_eq!(rows.len(), 1, "{rows:?}");
}

/// `RouteRequest` with its `query` as raw bytes, to send what a real
/// client's string type cannot hold.
#[derive(Clone, PartialEq, prost::Message)]
struct RawRouteRequest {
    #[prost(bytes = "vec", tag = "1")]
    query: Vec<u8>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_is_not_valid_protobuf_or_utf8_is_the_clients_error() {
    let server = common::start(Config {
        engine: EngineKind::Stub,
        ..Config::default()
    });
    let grpc = tonic::client::Grpc::new(server.channel().await);
    let route = |query: &[u8]| {
        let mut grpc = grpc.clone();
        let query = query.to_vec();
        async move {
            grpc.ready().await.unwrap();
            grpc.unary::<_, flywheel_proto::v1::RouteResponse, _>(
                tonic::Request::new(RawRouteRequest { query }),
                tonic::codegen::http::uri::PathAndQuery::from_static("/flywheel.v1.Router/Route"),
                tonic_prost::ProstCodec::default(),
            )
            .await
        }
    };
    let e = route(b"caf\xe9 finance question").await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("UTF-8"), "{}", e.message());
    assert!(e.message().contains("query"), "{}", e.message());
    // The same field as valid UTF-8 is routed.
    let ok = route("café finance question".as_bytes()).await.unwrap().into_inner();
    assert_eq!(ok.route.unwrap().expert, "finance");
}
