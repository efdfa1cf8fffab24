//! Client credentials without a secret, for tests: fixed RSA test keys, client certificates
//! made from them (rcgen), and RS256-signed JWTs (ring) for federated or hand-made
//! assertions. The token endpoint's side (verifying assertions) is in `token/assertion.rs`.
//!
//! The keys are fixed (generated once with `openssl genpkey -algorithm RSA -pkeyopt
//! rsa_keygen_bits:2048`): ring cannot generate RSA keys, and they protect nothing.

use base64::Engine as _;
use rcgen::{CertificateParams, DnType, KeyPair, PKCS_RSA_SHA256};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A fixed 2048-bit RSA test key (PKCS#8), the "registered" client key in tests.
pub const RSA_KEY_A: &str = "-----BEGIN PRIVATE KEY-----\nMIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQCugF4Joti54j9w\nImtxkzCx33rlcRoU3PEhZcgnRw6xYCTDL7cQBz51BUbtdaptKC+qM4Gf3t5ujBdI\n2PDyHQK6AIdKL6P0Y+T/WVQ5vLCj3h3PiaEPE1uH9RPWgU2U5C+py2HTK7NnEz5U\nWQToXnO82bv71pUJc/clMK28P1U/T0h+6i7s71V/kOG8DqdDAJxSGpFGoUfMF+sp\nDsB9Gen9bDogwnbpphkrkJlasswXMGBtMqFugDhwt+QByRQzos+Or8nGMP/SJ8D6\nAXDkmZy8TvcWDumFXMLQnuje9LPZy3TF1N93g96D6vQPue6WUHETkO1kSaPBNTYf\nXBAFRhcLAgMBAAECggEATxahCE8FWSJAzErdVYl3jXaTVcAwKPqGUzO1Ro//Ccdg\nghJzLtGJrjHpFqC40GZhTAuyGUpCl+nod7zTX3hkjvbEWoxDC/XmiRDsioqJqIt4\nCWMAWzvTxUf/aL4L8oqFS7iBKttooTPokQQTpFmCrTol6Bs2SyWDAxkP9PzjXyCH\nDkySgcR5fsiUxmPSf16JlxjasJhVaTpRcLSHDaglVSp4Pmuw6aabOYsHoGf+8v7I\nP7XGQMO7q2f95ChdBzTFRTDHFv450n7Bo/F5kEBUWU5moo8mS/klWbpBoWoLQ/A+\nmo8hO86nxuSM2kYLcKjmdCg/YrFwzjpn5w002RlyuQKBgQD2SzLfWpSMtxarAJRO\nsLoD4RvKwb2k6deVjgtjCppurdPFsFWDRrlVTxRE1iYTPaSsvUPqVX0m+dIw4f3E\nLvbIORu7tp4tCrBCndBzjjBvrWYRIiyDdeiazZN7alrFGm8gy9f1LFECVB7d32Gk\n6f5KXTYbq1i7nU4yIlqc5NYBdwKBgQC1YN9WaXfGdC+u9n5LVxC2Q901JycIu/g1\nLF35naH01wWvJoEBI4/+sxaK1mDkpCn/qkLePS9CzhhbjHkobYc/rL89mD7YQSGi\nI4XPYGjPEPjGOkz4OR8CgSxod9YKuUweyt8+MmmQ+b8tmUCHUy8OGNEfdGGQywH7\nc68DW3kcDQKBgQDUo9wKJmQ2kSRLAzcIMWCIVOPvzBF1vkbY4khGfDMU95LtDO7n\nZjpAwwOW4uUAm6n/UXC/couZCPtGJPc5V+rMtzGQgXxTGvVOrn34Jnz/DlAe3shb\nv4LRlEeOuCYiIk5rnFKZZGeUgRgdKu1cuoFHpu4+OVNkt815T1u4NYHmxQKBgAMr\nOxuuYgpUk1SyN8inL8KPcvjvwy3S4uZC7S1kRKUbcJz7xjs33NctV9J7Jlw4RgeS\nePKbDQ1UvnYzARbkuv0wznKMC2UJ1kWX60mRPKOJf18vO5MGpHUNvrHgjhvH2v2a\nu8XBabi/tEheqhLzMBpF8rli9iVqdpFnFwKvAXGtAoGBAJsANZie6IRuExtS1SG3\nr5+lt+Tm+K0+/8A4pK/73IcigVnHsDmXZBY4wcRTMJy3RY/FkXKRFbttlr7/iRbh\nJbv1IYuLwgNSu3H9W09Ra4caVycvJigUvY4hJZK5BQl1Y7RTLkUwDfYXZ8jewnBW\n5gLSk4CQYo5wULUvGsK2CWm1\n-----END PRIVATE KEY-----\n";
/// A second fixed RSA test key (PKCS#8): "a different key" for tampering tests.
pub const RSA_KEY_B: &str = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQCfR2HXvF0YG4FX\nutxU8piiLgtkqEcIFGfkRAqdPha/V/AVD4aMzmZvoDGg8cOCqfM+o8azKu0jtTFz\nrt1il5MC6vherjFJSzVnAJlrSRLFe9+mYzF4BgdPouAwT64BV1YVBdKzZ8HDDSJL\nQCUWOWVQNYo+ipIH3kfDo6p+hlk9tOKn8jWppxd4bvENWWUJZwx860wLftT3tNzo\nfbOTNqD3SU9/pazIzkyJIgS5cpFgh8hsnUwZ9rnxsoaNb556XTdaltyjcAp0f1BW\nqxDq4dgy8w1FXFpiBf9NBNt1/OaiNulIA5USZH5zc+Jhy04o2nCXvVbMvG0JUcEZ\ndNwF7E/BAgMBAAECggEAHR8JuE4v7iWvQQlA2gYt2m8VNa7fp85FTXKURzoQIiVT\nl6IqTUm6aFvPXxf80UG937zFakIlr9Ljyv0UbH9+iTjJNtRd3gLybVXqdvdaB4HV\nuv/lTka55PlISIT08TlU24ygQJ1ui3k2BTCh5z2QtLjJQRSITQh6sf4VQMNTAykq\ns7n1bEMhb2A+14MItdaArhlxqmKJZBUQ66d+0b1alHp/u8t9Q4WVUeZYcvdI8HXz\nLmhdIyMUhwpk1+SfDJ/hKlwHkf55/+zhNhULu8MKUZ9jnFfpg6J4MZ/PAM8sYe9r\nUpWUzilKm7LbXqf1scFXQBOnMEtEE4WGV/Mc5OSRTQKBgQDM6mQyHJ3nvzJfeFOn\nygRKWo2/SR7CKp3w3gV2JoRDXKBngyj2Ho2Qjw9tqis79MloyP6pbZ12eQ9ujfRp\nUkQQJL7a+ntAXnfm6TLAfYAqTYvt9g0UZWkQ7vPzmCnDKAjXVAcZODvKlD/nFfY3\nvtifJmlTl1/A+WP7mpMnJEIDdQKBgQDG/Hn0UCDvRq9EW8BC1agmuTh4fjIJa1yl\nfTpXSCX4RhndCSr29mwQ1VkdFgDsFiRd4+fiWJfvIA9LKS5ZOIIPOnnN/Qa29259\nSCPTO5yG+1L7GhmMiGS5QJD8XReHa4yZX+hvZuSiLpMUsYnX7CKEXXdYLuqFpFUz\ntmj6Bg5NnQKBgQCHyXqDynrIquYSZYXp1fBp5P+xFh8Pw3XNuxIbbQKQML0KWtu1\n3CEq/eHXZcAohtlAWpCGbWC+tRIIzIB9mkoH+JGQQhOSYAdMOJOtAnz/i0uCcF3S\nejDZS77UWKyz6b+SENhzWdQlNX/y/Zae8hRRwf5hqhmFor0iaRfCBEDKUQKBgFAM\nKRM7WMRo7wDU2BcK1EYfpLP0MDTR18dLBTkvcPbbXHQqx/npT7fF279zppNSpPaQ\nRCwt75DmmMBnpJmHvepaX72Z2CWqi+wiJSdIh8NVPyB8c2KxS7OqYajj2h9ECJ96\nkYqfHcKQceKVORp/h7Mv1l7HINj6LrxK2Rgbb42RAoGAP4nMpYXm3xgp2SH3OWKy\n6eQ7VqJLi3/Fi/aJ6++3G4nY+XOu06RhcQmaAlFj8pI9hnpXHdo5WKUzujWfDtW+\nshIxMiVAwuIwQuLoi9lgzlB1I5I1FLTgxZeIfTriqw4iowucLpx57SMeK+pG5vej\nScA76wr8acPhnf+Z7z00a/E=\n-----END PRIVATE KEY-----\n";
/// [`RSA_KEY_B`] in PKCS#1 form (`BEGIN RSA PRIVATE KEY`).
pub const RSA_KEY_B_PKCS1: &str = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAn0dh17xdGBuBV7rcVPKYoi4LZKhHCBRn5EQKnT4Wv1fwFQ+G\njM5mb6AxoPHDgqnzPqPGsyrtI7Uxc67dYpeTAur4Xq4xSUs1ZwCZa0kSxXvfpmMx\neAYHT6LgME+uAVdWFQXSs2fBww0iS0AlFjllUDWKPoqSB95Hw6OqfoZZPbTip/I1\nqacXeG7xDVllCWcMfOtMC37U97Tc6H2zkzag90lPf6WsyM5MiSIEuXKRYIfIbJ1M\nGfa58bKGjW+eel03Wpbco3AKdH9QVqsQ6uHYMvMNRVxaYgX/TQTbdfzmojbpSAOV\nEmR+c3PiYctOKNpwl71WzLxtCVHBGXTcBexPwQIDAQABAoIBAB0fCbhOL+4lr0EJ\nQNoGLdpvFTWu36fORU1ylEc6ECIlU5eiKk1Jumhbz18X/NFBvd+8xWpCJa/S48r9\nFGx/fok4yTbUXd4C8m1V6nb3WgeB1br/5U5GueT5SEiE9PE5VNuMoECdbot5NgUw\noec9kLS4yUEUiE0IerH+FUDDUwMpKrO59WxDIW9gPteDCLXWgK4ZcapiiWQVEOun\nftG9WpR6f7vLfUOFlVHmWHL3SPB18y5oXSMjFIcKZNfknwyf4SpcB5H+ef/s4TYV\nC7vDClGfY5xX6YOieDGfzwDPLGHva1KVlM4pSpuy216n9bHBV0ATpzBLRBOFhlfz\nHOTkkU0CgYEAzOpkMhyd578yX3hTp8oESlqNv0kewiqd8N4FdiaEQ1ygZ4Mo9h6N\nkI8PbaorO/TJaMj+qW2ddnkPbo30aVJEECS+2vp7QF535ukywH2AKk2L7fYNFGVp\nEO7z85gpwygI11QHGTg7ypQ/5xX2N77YnyZpU5dfwPlj+5qTJyRCA3UCgYEAxvx5\n9FAg70avRFvAQtWoJrk4eH4yCWtcpX06V0gl+EYZ3Qkq9vZsENVZHRYA7BYkXePn\n4liX7yAPSykuWTiCDzp5zf0GtvdufUgj0zuchvtS+xoZjIhkuUCQ/F0Xh2uMmV/o\nb2bkoi6TFLGJ1+wihF13WC7qhaRVM7Zo+gYOTZ0CgYEAh8l6g8p6yKrmEmWF6dXw\naeT/sRYfD8N1zbsSG20CkDC9ClrbtdwhKv3h12XAKIbZQFqQhm1gvrUSCMyAfZpK\nB/iRkEITkmAHTDiTrQJ8/4tLgnBd0now2Uu+1Fiss+m/khDYc1nUJTV/8v2WnvIU\nUcH+YaoZhaK9ImkXwgRAylECgYBQDCkTO1jEaO8A1NgXCtRGH6Sz9DA00dfHSwU5\nL3D221x0Ksf56U+3xdu/c6aTUqT2kEQsLe+Q5pjAZ6SZh73qWl+9mdglqovsIiUn\nSIfDVT8gfHNisUuzqmGo49ofRAifepGKnx3CkHHilTkaf4ezL9ZexyDY+i68StkY\nG2+NkQKBgD+JzKWF5t8YKdkh9zlisunkO1aiS4t/xYv2ievvtxuJ2PlzrtOkYXEJ\nmgJRY/KSPYZ6Vx3aOVilM7o1nw7VvrISMTIlQMLiMELi6IvZYM5QdSOSNRS04MWX\niH064qsOIqMLnC6cee0jHivqRub3o0nAO+sK/GnD4Z3/me89NGvx\n-----END RSA PRIVATE KEY-----\n";
/// A third fixed RSA test key (PKCS#8), for service accounts.
pub const RSA_KEY_C: &str = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQCc+N5lQxtE54NC\nGbzCgEBnDaA+/hfUtyLxph1MTjXaZcDzNUyGN72s92LV51VtbGgybyVdEE1VfckH\nwTHdFo4e5fRPOyKUokqYxT67kWjzqlA4SA4QGyNpCBdfWY/aRu2U5j+nrEc8wp6n\nIS5kE/vYL1YRrB1dnIhD3XBuvpjnjqT5ozXTSBqxItY6EAhFOk7U1PADvcvMQU7c\ndW+iIxwe6q/6QBuIBMlGzTQy0cPERD37vC2di8q+jaQfCh71W8YzMyGq4KrM+QNy\n6+Tg3XH/n8t+uURZumn2tCeL/AAGR60QFt5jmXatkKf2zd0awiyG4MmCX4xILqKm\nyhXMl21jAgMBAAECggEAMOpSr16KlF3KpuILUtcRequh2I9o0LYjEwePULR8jqqv\nxnpA9wBOwKQ0rfCRS/CAxdqh247VcoMojpyTE9DQB+vjxn7oh0XNli69HkkxWeEk\nb21wyG8UiUnmsqVfsQbySTi49GC4sEP7mZw67x/VFqilmws1+XJqei96tl/5mQp6\n6VuZJ/PpcdOO+ErH8AxfjmfPGFpoQu+4jUBSrTP4jmJL0qt4UWY+zR0xCx3iudCJ\nH8ej/VKwK/x9QiGQBTNeAP9X6IOYd9ByX/5Afn+pM+8qEQ67Ca7hiR7Xzu0R3Z40\nE/0Fm058GYHZ8hOv0u3Gg90BNIGmaUHUxD7RcOoq8QKBgQDRrTXbxfF7BwvOcXiC\nMhC+HML2jV7AaH7669lt+RExYpPFQGc/nBHJx3D60CN/WPuS4pC6H9gHIqvwUFPz\nFv/dlIG03TdP159J3lWKlzll8eAbUH2f63LDdcEdDFNhGMwLo3J5dIh6nUN2ayxt\n2xFHNBR/f58kunAs4hv+DZL3MQKBgQC/ptMX70DIS1SDBnMuaxr6s1o2+6ulR6r+\naAVvRJE1Zaqxemi5w9EmhxAvBwyiWVryB/FsHuvfJx7dYpw/JpNf1M81toWC2lAq\nGnSQcVzmrC0u4JYVISh6mWNlFLQjEkKkoyM+M8bgsw8h487Jw5QsDstZHZKLp/1Z\nSytJIcSw0wKBgGU/PIiZNpfvuRXA2S4VOtxySvp/HUfPrbFAfceKw3CTZ0OSa8jd\ndgF3Wujh5KIzt5cf7D7T7Z7UcS4ju8XgT0ER2ugZAgJ93h7vS2MWztKZT1whK+gy\n60HS9KMwNnrmXHEqRba8PMLoeZEPA28wn1FApr1CRPiZRl2F+Xpd15+hAoGAUScs\nBduKvAWh8KV/im1SDEx77AJfqWoSjw2vF3GaZ1j4kZR62gZ//ud8Q92hTPG3X/tb\nEGR7jo+7MxV5gggsqYysfVsfZ8xX26w+JZfLNeY8b7gr9SCISnm/K+M7cApga+Sk\nnMdB9I3932TegHMvwAQ3uTGbh0WIMxJwbtQ8vH8CgYEAx7FxN+d0gXehXNNrPnw2\nJCgXzN+M9Wq+xGnCmdqTa/GUMfXsJlYKdvVh1SzguXHAyeMwpiWcBX3/vuvhY23G\nW8UgcaWJIKpIhhrnAmUP2kKgfRHrY3XPFMDxmnB81OW+7bAMBrKxJopURRXjqoFW\npFnmGMYigla8qnGK47G9xg4=\n-----END PRIVATE KEY-----\n";

/// The audience of a federated (workload identity) assertion exchanged at Entra ID.
pub const FEDERATED_AUDIENCE: &str = "api://AzureADTokenExchange";

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A self-signed certificate (PEM) for the RSA key `key_pem` (PKCS#8), valid from a day ago
/// until `valid_secs` from now (negative: already expired), common name `cn`.
pub fn rsa_certificate(key_pem: &str, cn: &str, valid_secs: i64) -> String {
    let key = KeyPair::from_pem_and_sign_algo(key_pem, &PKCS_RSA_SHA256)
        .expect("a fixed PKCS#8 RSA test key");
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, cn);
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    let now = epoch + Duration::from_secs(unix_now());
    params.not_before = now - Duration::from_secs(2 * 86_400);
    params.not_after = if valid_secs >= 0 {
        now + Duration::from_secs(valid_secs.unsigned_abs())
    } else {
        now - Duration::from_secs(valid_secs.unsigned_abs())
    };
    params
        .self_signed(&key)
        .expect("fixed certificate parameters always serialize")
        .pem()
}

/// base64url without padding (JWT encoding).
pub fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A JWT `header.claims.signature` signed RS256 with `key_pem` (PKCS#8 or PKCS#1 RSA).
pub fn sign_jwt(key_pem: &str, header: &serde_json::Value, claims: &serde_json::Value) -> String {
    let input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let der = pem_der(key_pem);
    let key = ring::signature::RsaKeyPair::from_pkcs8(&der)
        .or_else(|_| ring::signature::RsaKeyPair::from_der(&der))
        .expect("an RSA test key");
    let mut sig = vec![0u8; key.public().modulus_len()];
    key.sign(
        &ring::signature::RSA_PKCS1_SHA256,
        &ring::rand::SystemRandom::new(),
        input.as_bytes(),
        &mut sig,
    )
    .expect("RSA signing");
    format!("{input}.{}", b64url(&sig))
}

/// A federated assertion as the Kubernetes kubelet projects it (signed with `key_pem`):
/// `iss` = `issuer`, `sub` = `subject`, `aud` = [`FEDERATED_AUDIENCE`], valid an hour.
pub fn federated_assertion(key_pem: &str, issuer: &str, subject: &str) -> String {
    let now = unix_now();
    sign_jwt(
        key_pem,
        &serde_json::json!({"alg": "RS256", "typ": "JWT", "kid": "test"}),
        &serde_json::json!({
            "iss": issuer, "sub": subject, "aud": [FEDERATED_AUDIENCE],
            "iat": now, "nbf": now, "exp": now + 3600,
        }),
    )
}

/// A Google service account JSON key file's content for `client_email` with `key_pem`.
pub fn service_account_json(client_email: &str, key_pem: &str, token_uri: &str) -> String {
    serde_json::json!({
        "type": "service_account",
        "project_id": "test-project",
        "private_key_id": "0123456789abcdef",
        "private_key": key_pem,
        "client_email": client_email,
        "client_id": "100000000000000000000",
        "token_uri": token_uri,
    })
    .to_string()
}

/// The DER bytes of the first PEM block in `pem`.
pub(crate) fn pem_der(pem: &str) -> Vec<u8> {
    let body: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(body.trim())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_certificates_and_jwts() {
        let cert = rsa_certificate(RSA_KEY_A, "client", 86_400);
        assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"), "{cert}");
        let jwt = sign_jwt(
            RSA_KEY_B_PKCS1,
            &serde_json::json!({"alg": "RS256"}),
            &serde_json::json!({"a": 1}),
        );
        let same = sign_jwt(
            RSA_KEY_B,
            &serde_json::json!({"alg": "RS256"}),
            &serde_json::json!({"a": 1}),
        );
        // PKCS#1 v1.5 signatures are deterministic: the two forms are the same key.
        assert_eq!(jwt, same);
        assert_eq!(jwt.split('.').count(), 3);
    }
}
